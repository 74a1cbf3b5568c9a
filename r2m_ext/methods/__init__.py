"""R²M and the baselines as per-tensor math over a TaskTensors source (no files, no passes over
disk: the source decides where tensors come from). One module per method, each registering a
`MergeMethod` (registry.py); `common.py` holds what several share."""

from r2m_ext.methods.registry import MergeMethod, get_method, method_names, register

__all__ = ["MergeMethod", "get_method", "method_names", "register"]
