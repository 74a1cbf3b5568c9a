"""Finds the native extension without ever compiling it. Importing r2m_ext works without it; the
ops then run their pure-torch reference (r2m_ext/reference.py).

R2M_EXT_BACKEND chooses: `auto` (default: native when built), `torch` (the pure-torch ops even
when the extension is built: to compare the two, or to rule the kernels out when debugging), or
`native` (fail at the first op rather than fall back silently when the extension is missing)."""

from __future__ import annotations

import functools
import logging
import os

from r2m_ext._version import __version__

log = logging.getLogger("r2m_ext")

BACKEND_VARIABLE = "R2M_EXT_BACKEND"
BACKEND_CHOICES = ("auto", "native", "torch")


def backend_choice() -> str:
    choice = os.environ.get(BACKEND_VARIABLE, "auto").strip().lower() or "auto"
    if choice not in BACKEND_CHOICES:
        raise ValueError(
            f"{BACKEND_VARIABLE}={os.environ[BACKEND_VARIABLE]!r}: expected one of "
            f"{', '.join(BACKEND_CHOICES)}"
        )
    return choice


@functools.cache
def native_module():
    """The loaded r2m_ext._C module, or None. Logged once, the first time it is asked for."""
    choice = backend_choice()
    if choice == "torch":
        log.info("r2m_ext %s: pure-torch backend (%s=torch)", __version__, BACKEND_VARIABLE)
        return None
    try:
        from r2m_ext import _C
    except ImportError as error:
        if choice == "native":
            raise ImportError(
                f"{BACKEND_VARIABLE}=native, but the extension r2m_ext._C cannot be loaded "
                f"({error}); build it with `make build` or `pip install -e .`"
            ) from error
        log.info("r2m_ext %s: pure-torch backend (extension not built: %s)", __version__, error)
        return None
    log.info("r2m_ext %s: %s", __version__, _describe(_C))
    return _C


def _describe(module) -> str:
    cuda = "CPU and CUDA kernels" if module.with_cuda else "CPU kernels"
    return f"native backend r2m_ext._C ({cuda}, built against torch {module.torch_version})"


def version_text() -> str:
    """`r2m --version`: the version and backend, then the torch and Python it runs with (a
    native build runs only with the torch release it was built against)."""
    import platform

    import torch

    running = f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"
    text = f"{backend_info()}\nrunning with {running}, Python {platform.python_version()}"
    module = native_module()
    if module is not None and module.torch_version != torch.__version__:
        text += f"\nwarning: built against torch {module.torch_version}: rebuild r2m_ext"
    return text


def backend_info() -> str:
    """One line saying which backend the ops use, e.g. for `r2m --version` and the demo."""
    module = native_module()
    if module is not None:
        return f"r2m_ext {__version__}: {_describe(module)}"
    why = f"{BACKEND_VARIABLE}=torch" if backend_choice() == "torch" else "r2m_ext._C not built"
    return f"r2m_ext {__version__}: pure-torch backend ({why})"
