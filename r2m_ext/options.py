"""Every merge option of ../shared/r2m-spec.md, its default per method, and its validation.

`MergeOptions` is the one place the Python API, the CLI flags (`_` -> `-`) and the recipe file map
onto. A field left as None means "the method's default"; `resolve_options` fills those in, and
rejects options that the chosen method does not use, so no flag is ever silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from r2m_ext.errors import R2MError

METHODS = ("r2m", "average", "task_arithmetic", "ties", "dare", "tsv", "cart")
DEFAULT_HEAD_PATTERNS = ("head.*", "*.head.*", "classifier.*", "*.classifier.*", "fc.*")
DEFAULT_EXCLUDE_TRUNCATION = ("*embed*", "*pos*", "*token*")
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
OUT_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

_SVD_DEFAULTS = {"svd": "randomized", "oversample": 8, "n_iter": 2, "seed": 0}
_COMMON_DEFAULTS = {
    "head_patterns": DEFAULT_HEAD_PATTERNS,
    "exclude_truncation": DEFAULT_EXCLUDE_TRUNCATION,
    "compute_dtype": "float32",
    "out_dtype": None,
    "allow_nonfinite": False,
}


def method_defaults(method: str, dare_combine: str | None = None) -> dict[str, Any]:
    """The options `method` uses, with their spec defaults (the only table of defaults)."""
    if method == "r2m":
        specific = {
            "k": 1,
            "center": False,
            "residual": "core",
            "rank_ratio": 0.1,
            **_SVD_DEFAULTS,
            "norm_scope": "global",
            "residual_scale": "relative",
            "alpha": 0.6,
        }
    elif method == "average":
        specific = {}
    elif method == "task_arithmetic":
        specific = {"lam": 0.3}
    elif method == "ties":
        specific = {"density": 0.2, "ties_scope": "global", "lam": 1.0}
    elif method == "dare":
        specific = {"drop_rate": 0.9, "seed": 0, "dare_combine": dare_combine or "task_arithmetic"}
        if specific["dare_combine"] == "ties":
            specific.update(density=0.2, ties_scope="global", lam=1.0)
        else:
            specific.update(lam=0.3)
    elif method == "tsv":
        specific = {**_SVD_DEFAULTS, "alpha": 1.0}
    elif method == "cart":
        specific = {**_SVD_DEFAULTS, "rank_ratio": 0.12, "lam": 2.0}
    else:
        raise R2MError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return {**specific, **_COMMON_DEFAULTS}


def _option(help: str, choices: tuple | None = None, check=None, check_text: str = ""):
    return field(
        default=None,
        metadata={"help": help, "choices": choices, "check": check, "check_text": check_text},
    )


@dataclass(frozen=True)
class MergeOptions:
    """All options of all methods. Use `resolve_options` to build one with defaults filled in."""

    method: str = "r2m"
    k: int | None = _option(
        "R²M: number of top eigenpairs of the task-vector Gram kept as the Real core",
        check=lambda v: v >= 1,
        check_text=">= 1",
    )
    center: bool | None = _option(
        "R²M: center task vectors before estimating the core (the paper's equation; see spec §1)"
    )
    residual: str | None = _option(
        "R²M: 'core' (r_i = tau_i - tau_core) or 'projection' (r_i = tau_i - P tau_i)",
        choices=("core", "projection"),
    )
    rank_ratio: float | None = _option(
        "R²M/CART: kept rank = max(1, floor(rank_ratio * min(m, n))) per matrix",
        check=lambda v: 0 < v <= 1,
        check_text="in (0, 1]",
    )
    svd: str | None = _option(
        "how truncations are computed: 'randomized' (seeded sketch) or 'exact' (full SVD)",
        choices=("randomized", "exact"),
    )
    oversample: int | None = _option(
        "randomized SVD: extra sketch columns beyond the kept rank",
        check=lambda v: 0 <= v < 2**31,
        check_text="in [0, 2**31)",
    )
    n_iter: int | None = _option(
        "randomized SVD: power iterations (re-orthonormalised after every product)",
        check=lambda v: 0 <= v < 2**31,
        check_text="in [0, 2**31)",
    )
    seed: int | None = _option(
        "seed of the randomized sketch (R²M, TSV, CART) or of DARE's drop mask",
        check=lambda v: 0 <= v < 2**64,
        check_text="in [0, 2**64)",
    )
    norm_scope: str | None = _option(
        "R²M: match residual norms over all tensors together ('global') or per tensor ('tensor')",
        choices=("global", "tensor"),
    )
    residual_scale: str | None = _option(
        "R²M: eta = alpha*|core|/|res| ('relative'), alpha*|core| ('literal'), or alpha ('fixed')",
        choices=("relative", "literal", "fixed"),
    )
    alpha: float | None = _option("R²M: residual strength; TSV: scale of the merged update")
    lam: float | None = _option("task arithmetic / TIES / DARE / CART: scale of the merged update")
    density: float | None = _option(
        "TIES: fraction of entries kept per task (largest magnitudes)",
        check=lambda v: 0 < v <= 1,
        check_text="in (0, 1]",
    )
    ties_scope: str | None = _option(
        "TIES: magnitude threshold over all tensors ('global', paper) or per tensor ('tensor')",
        choices=("global", "tensor"),
    )
    drop_rate: float | None = _option(
        "DARE: probability of dropping each task-vector entry",
        check=lambda v: 0 <= v < 1,
        check_text="in [0, 1)",
    )
    dare_combine: str | None = _option(
        "DARE: how the sparsified task vectors are combined",
        choices=("task_arithmetic", "ties"),
    )
    head_patterns: tuple[str, ...] | None = _option(
        "glob patterns of head tensors (averaged over experts, excluded from everything else)"
    )
    exclude_truncation: tuple[str, ...] | None = _option(
        "glob patterns (case-insensitive) of 2-D tensors that are never truncated"
    )
    compute_dtype: str | None = _option("dtype of all arithmetic", choices=tuple(COMPUTE_DTYPES))
    out_dtype: str | None = _option(
        "dtype of the merged tensors (default: each base tensor's dtype)", choices=tuple(OUT_DTYPES)
    )
    allow_nonfinite: bool | None = _option("merge even if inputs contain NaN or Inf")

    def to_dict(self) -> dict[str, Any]:
        """The options the method uses (None fields dropped), lists as lists: the recipe's form."""
        out = {}
        for name, value in dataclasses.asdict(self).items():
            if value is None and name != "out_dtype":
                continue
            out[name] = list(value) if isinstance(value, tuple) else value
        return out


OPTION_FIELDS = {f.name: f for f in dataclasses.fields(MergeOptions) if f.name != "method"}


def _check_type(name: str, value: Any, default: Any) -> Any:
    """Coerces `value` to the type of the option's default, or raises with the option's name."""
    kind = type(default) if default is not None else str
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise R2MError(f"option {name}: expected a list of glob patterns, got {value!r}")
        return tuple(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise R2MError(f"option {name}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise R2MError(f"option {name}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise R2MError(f"option {name}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an int beyond float's range
            number = math.inf
        if not math.isfinite(number):
            raise R2MError(f"option {name}: {value!r} is not a finite number")
        return number
    if not isinstance(value, str):
        raise R2MError(f"option {name}: expected a string, got {value!r}")
    return value


def resolve_options(method: str = "r2m", **given: Any) -> MergeOptions:
    """Validates `given` (options as the spec names them) for `method` and fills in defaults.

    Options set to None count as not given. An option that `method` does not use is an error.
    """
    given = {name: value for name, value in given.items() if value is not None}
    unknown = sorted(set(given) - set(OPTION_FIELDS))
    if unknown:
        raise R2MError(
            f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(OPTION_FIELDS))}"
        )
    if method not in METHODS:
        raise R2MError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    defaults = method_defaults(method, given.get("dare_combine"))
    unused = sorted(set(given) - set(defaults))
    if unused:
        raise R2MError(
            f"option(s) {', '.join(unused)} do not apply to method {method!r}"
            f" (it uses: {', '.join(sorted(defaults))})"
        )
    values = {}
    for name, default in defaults.items():
        if name not in given:
            values[name] = default
            continue
        meta = OPTION_FIELDS[name].metadata
        value = _check_type(name, given[name], default if default is not None else "")
        if meta["choices"] is not None and value not in meta["choices"]:
            raise R2MError(
                f"option {name}: {value!r} is not one of {', '.join(map(str, meta['choices']))}"
            )
        if meta["check"] is not None and not meta["check"](value):
            raise R2MError(f"option {name}: {value!r} must be {meta['check_text']}")
        values[name] = value
    return MergeOptions(method=method, **values)
