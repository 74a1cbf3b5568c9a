"""r2m_ext: Real-aware Residual Model Merging (R²M) and its baselines, as a PyTorch extension.

    import r2m_ext
    merged = r2m_ext.merge(base_state_dict, [expert1, expert2], method="r2m", alpha=0.6)
    r2m_ext.merge_files("base/", ["expert1/", "expert2/"], "merged/", method="ties")
    r2m_ext.merge_config("mergekit.yaml", "merged/")  # a recipe or a mergekit config

Importing never compiles anything; without the native extension the ops run in pure torch
(`r2m_ext.backend_info()` says which).
"""

from r2m_ext._backend import backend_info
from r2m_ext._version import __version__
from r2m_ext.api import merge, merge_config, merge_files
from r2m_ext.errors import R2MError
from r2m_ext.methods.registry import method_names
from r2m_ext.options import MergeOptions, resolve_options


def __getattr__(name: str):
    # METHODS is read when asked, so that methods registered by entry points are in it.
    if name == "METHODS":
        return method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METHODS",
    "MergeOptions",
    "R2MError",
    "__version__",
    "backend_info",
    "merge",
    "merge_config",
    "merge_files",
    "method_names",
    "resolve_options",
]
