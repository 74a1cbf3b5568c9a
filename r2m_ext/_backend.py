"""Finds the native extension without ever compiling it. Importing r2m_ext works without it; the
ops then run their pure-torch reference (r2m_ext/reference.py)."""

from __future__ import annotations

import functools
import logging

from r2m_ext._version import __version__

log = logging.getLogger("r2m_ext")


@functools.cache
def native_module():
    """The loaded r2m_ext._C module, or None. Logged once, the first time it is asked for."""
    try:
        from r2m_ext import _C
    except ImportError as error:
        log.info("r2m_ext %s: pure-torch backend (extension not built: %s)", __version__, error)
        return None
    log.info("r2m_ext %s: %s", __version__, _describe(_C))
    return _C


def _describe(module) -> str:
    cuda = "CPU and CUDA kernels" if module.with_cuda else "CPU kernels"
    return f"native backend r2m_ext._C ({cuda}, built against torch {module.torch_version})"


def backend_info() -> str:
    """One line saying which backend the ops use, e.g. for `r2m --version` and the demo."""
    module = native_module()
    if module is None:
        return f"r2m_ext {__version__}: pure-torch backend (r2m_ext._C not built)"
    return f"r2m_ext {__version__}: {_describe(module)}"
