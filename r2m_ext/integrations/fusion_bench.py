"""r2m_ext's R²M, TSV-M and CART as FusionBench algorithms (fusion-bench 0.2.33's
`BaseAlgorithm`: `run(modelpool)` returns the merged model), computed by `r2m_ext.merge` on the
pool's state dicts. Use them in Python, through `_target_`, or from the command line with the
Hydra configs shipped beside this module:

    fusion_bench --config-dir $(python -m r2m_ext.integrations.fusion_bench) \\
        method=r2m_ext/tsv modelpool=... taskpool=...

Options are r2m_ext's (`r2m merge --help`), validated by r2m_ext; `exclude_keys` (FusionBench's
convention: parameter names kept out of every SVD) adds exact names to `exclude_truncation`.
TSV-M and CART default to FusionBench's treatment of tensors (every 2-D tensor factored, no
head kept aside: `head_patterns` and `exclude_truncation` empty), R²M to the spec's.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, ClassVar

from fusion_bench import BaseAlgorithm, BaseModelPool

import r2m_ext
from r2m_ext.options import DEFAULT_EXCLUDE_TRUNCATION

CONFIG_DIR = Path(__file__).resolve().parent / "fusion_bench_config"


class R2MExtAlgorithm(BaseAlgorithm):
    """r2m_ext's `method` merging the pool's models into its pretrained model (`_pretrained_`),
    which is changed in place and returned, as FusionBench's own algorithms do."""

    method: ClassVar[str]
    # Options that differ from r2m_ext's defaults for this algorithm.
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, exclude_keys: list[str] | None = None, **options: Any):
        super().__init__()
        self.exclude_keys = list(exclude_keys or [])
        self.options = {**self.defaults, **options}
        if self.exclude_keys:
            exact = [glob.escape(name) for name in self.exclude_keys]
            self.options["exclude_truncation"] = [
                *self.options.get("exclude_truncation", DEFAULT_EXCLUDE_TRUNCATION),
                *exact,
            ]
        # Refuses unknown or out-of-range options now, not after the models are loaded.
        r2m_ext.resolve_options(self.method, **self.options)
        self.report: dict = {}

    def run(self, modelpool: BaseModelPool):
        pretrained = modelpool.load_pretrained_model()
        experts = [modelpool.load_model(name).state_dict() for name in modelpool.model_names]
        merged = r2m_ext.merge(
            pretrained.state_dict(), experts, self.method, report=self.report, **self.options
        )
        pretrained.load_state_dict(merged)
        return pretrained


# FusionBench factors every 2-D tensor and keeps no head aside.
_FUSION_BENCH_TENSORS = {"head_patterns": [], "exclude_truncation": []}


class R2MMerging(R2MExtAlgorithm):
    """Real-aware Residual Model Merging (r2m_ext's spec defaults)."""

    method = "r2m"


class TaskSingularVectorMerging(R2MExtAlgorithm):
    """TSV-M by r2m_ext (randomized SVD by default; `svd: exact` for FusionBench's result)."""

    method = "tsv"
    defaults = _FUSION_BENCH_TENSORS


class CARTMerging(R2MExtAlgorithm):
    """CART by r2m_ext."""

    method = "cart"
    defaults = _FUSION_BENCH_TENSORS


if __name__ == "__main__":
    print(CONFIG_DIR)
