"""r2m_ext inside and beside other merge tools: mergekit's YAML configs run by r2m_ext
(mergekit_config.py), r2m_ext's TSV-M and CART registered inside mergekit (mergekit.py), and
r2m_ext's algorithms for FusionBench with their Hydra configs (fusion_bench.py). The last two
import their tool (as r2m_ext/peft.py imports PEFT); the merge itself never needs them."""
