"""r2m_ext inside and beside other merge tools: mergekit's YAML configs (mergekit_config.py)."""
