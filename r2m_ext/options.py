"""A merge's options: the method's own (declared in its module, see methods/registry.py) and the
engine's, which every merge takes. `resolve_options` validates what the Python API, the CLI flags
(`_` -> `-`) and the recipe file give, fills in defaults, and rejects options the chosen method
does not use, so no flag is ever silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from r2m_ext.errors import R2MError
from r2m_ext.methods.registry import (
    get_method,
    method_names,
    method_options,
    option,
    reserve,
)

DEFAULT_HEAD_PATTERNS = ("head.*", "*.head.*", "classifier.*", "*.classifier.*", "fc.*")
DEFAULT_EXCLUDE_TRUNCATION = ("*embed*", "*pos*", "*token*")
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
OUT_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class EngineOptions:
    """What every merge takes, whatever its method: which tensors are heads or never truncated,
    the arithmetic and output dtypes, and whether NaN/Inf may pass."""

    head_patterns: tuple[str, ...] = option(
        DEFAULT_HEAD_PATTERNS,
        "glob patterns of head tensors (averaged over experts, excluded from everything else)",
    )
    exclude_truncation: tuple[str, ...] = option(
        DEFAULT_EXCLUDE_TRUNCATION,
        "glob patterns (case-insensitive) of 2-D tensors that are never truncated",
    )
    compute_dtype: str = option("float32", "dtype of all arithmetic", choices=tuple(COMPUTE_DTYPES))
    out_dtype: str | None = option(
        None,
        "dtype of the merged tensors (default: each base tensor's dtype)",
        choices=tuple(OUT_DTYPES),
        kind=str,
    )
    allow_nonfinite: bool = option(False, "merge even if inputs contain NaN or Inf")


ENGINE_FIELDS = {f.name: f for f in dataclasses.fields(EngineOptions)}
reserve(ENGINE_FIELDS, "the engine's options")


@dataclass(frozen=True)
class MergeOptions:
    """A merge's resolved options: `method_options` (the method's options dataclass) and
    `engine`. Every option reads as an attribute too (`options.alpha`, `options.compute_dtype`).
    Build one with `resolve_options`."""

    method: str
    method_options: Any
    engine: EngineOptions = EngineOptions()

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not fields; the guard keeps copy/pickle, which probe
        # attributes before the fields exist, from recursing.
        if name.startswith("__") or name in ("method_options", "engine"):
            raise AttributeError(name)
        for part in (self.method_options, self.engine):
            if name in {f.name for f in dataclasses.fields(part)}:
                return getattr(part, name)
        raise AttributeError(f"method {self.method!r} has no option {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """The method and every option it uses, lists as lists: the recipe's form."""
        out: dict[str, Any] = {"method": self.method}
        for part in (self.method_options, self.engine):
            for name, value in dataclasses.asdict(part).items():
                out[name] = list(value) if isinstance(value, tuple) else value
        return out


def option_fields() -> dict[str, dataclasses.Field]:
    """Every option name a merge may be given (any method's, then the engine's), with one
    declaration of its type and accepted values."""
    declared = {
        name: next(iter(by_method.values())) for name, by_method in method_options().items()
    }
    return {**declared, **ENGINE_FIELDS}


def _check_type(name: str, value: Any, kind: type) -> Any:
    """Coerces `value` to the option's type, or raises with the option's name."""
    if kind is tuple:
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


def _checked(name: str, value: Any, declared: dataclasses.Field) -> Any:
    meta = declared.metadata
    value = _check_type(name, value, meta["kind"])
    if meta["choices"] is not None and value not in meta["choices"]:
        raise R2MError(
            f"option {name}: {value!r} is not one of {', '.join(map(str, meta['choices']))}"
        )
    if meta["check"] is not None and not meta["check"](value):
        raise R2MError(f"option {name}: {value!r} must be {meta['check'].text}")
    return value


def _build(options_class: type, given: dict[str, Any]) -> Any:
    values = {
        name: _checked(name, given[name], declared)
        for name, declared in {f.name: f for f in dataclasses.fields(options_class)}.items()
        if name in given
    }
    return options_class(**values)


def resolve_options(method: str = "r2m", **given: Any) -> MergeOptions:
    """Validates `given` (options as the spec names them) for `method` and fills in defaults.

    Options set to None count as not given. An option that `method` does not use is an error.
    """
    given = {name: value for name, value in given.items() if value is not None}
    known = option_fields()
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise R2MError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    declaration = get_method(method)
    if declaration is None:
        raise R2MError(f"unknown method {method!r}; choose one of {', '.join(method_names())}")
    options_class = declaration.options_class(given)
    uses = {f.name for f in dataclasses.fields(options_class)} | set(ENGINE_FIELDS)
    unused = sorted(set(given) - uses)
    if unused:
        raise R2MError(
            f"option(s) {', '.join(unused)} do not apply to method {method!r}"
            f" (it uses: {', '.join(sorted(uses))})"
        )
    return MergeOptions(
        method=method,
        method_options=_build(options_class, given),
        engine=_build(EngineOptions, given),
    )
