"""The method registry: one `MergeMethod` declaration per method, from which the CLI flags, the
Python keywords, the recipe file's options and `--help` are all derived.

A method is one module that declares its options as a frozen dataclass of `option(...)` fields
and calls `register(MergeMethod(...))`. Modules of this package register on first use of the
registry; other packages register through the `r2m_ext.methods` entry-point group (an entry
point names a module, imported for its `register` calls), so a method is one new file either way.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

ENTRY_POINT_GROUP = "r2m_ext.methods"
# The method a merge runs when none is named; listed first.
DEFAULT_METHOD = "r2m"


def _bound_text(value: float) -> str:
    """2**31 rather than 2147483648 in messages and --help."""
    if isinstance(value, int) and value >= 1 << 16 and value & (value - 1) == 0:
        return f"2**{value.bit_length() - 1}"
    return str(value)


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: low and/or high bound, each open or closed."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __call__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None:
            return value < self.high if self.high_open else value <= self.high
        return True

    @property
    def text(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_bound_text(self.low)}"
        return (
            f"in {'(' if self.low_open else '['}{_bound_text(self.low)}, "
            f"{_bound_text(self.high)}{')' if self.high_open else ']'}"
        )


def option(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    check: Range | None = None,
    kind: type | None = None,
):
    """A dataclass field that is a merge option: its default, help, and accepted values. `kind`
    is the value type where the default (None) does not say it."""
    if kind is None:
        kind = tuple if isinstance(default, tuple) else type(default)
    metadata = {"help": help, "choices": choices, "check": check, "kind": kind}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class OptionVariants:
    """Options that depend on the value of one of them: DARE with dare_combine="ties" takes
    TIES's options too. `classes` maps each value of `selector` to its options dataclass; the
    first is the default."""

    selector: str
    classes: Mapping[str, type]

    def pick(self, given: Mapping[str, Any]) -> type:
        default = next(iter(self.classes.values()))
        return self.classes.get(given.get(self.selector), default)


@dataclass(frozen=True)
class MergeMethod:
    """One merge method. `merge(tensors, options, report)` yields the merged body tensors (see
    methods/common.py, TaskTensors) from an instance of its options dataclass."""

    name: str
    summary: str  # one line for --help
    options: type | OptionVariants
    merge: Callable[..., Iterator]
    passes: tuple[str, ...]  # its passes over the inputs, in order (for --help and reports)
    # Why this method needs an input tensor finite even with allow_nonfinite, or None.
    why_finite_required: Callable[[Any], str | None] = lambda entry: None
    # Raises (R2MError) when its options cannot merge this many experts; called before any
    # tensor is read.
    check_experts: Callable[[Any, int], None] = lambda options, n_experts: None
    # False for a method that needs settings to mean anything (mergekit's, which takes per-model
    # weights from a config): left out of comparisons that run every method with its defaults.
    runs_with_defaults: bool = True
    # Work per byte of a tensor's inputs, relative to a memory-bound pass (1): how ranks of a
    # distributed merge balance their shares (engine/ranks.py). A rough model, not a timing.
    relative_work: Callable[[Any], int] = lambda entry: 1
    # Whether each merged update is a linear combination, within the span of the experts'
    # update factors (average, task arithmetic, the SVD methods; not TIES's or DARE's
    # elementwise masks): then a merge of LoRA experts is an exact LoRA adapter.
    update_in_expert_span: bool = False
    # Whether a matrix every expert updates by LoRA factors is merged from the factors
    # (TaskTensors.low_rank_updates) in every pass, its experts' dense values never read: the
    # engine then does not read them ahead.
    merges_factors: bool = False
    # Report entries that count what each rank did (ints, or dicts of ints): summed over the
    # ranks of a distributed merge. Every other entry is the same on every rank, except the
    # per-tensor ones under report["tensors"], which the rank owning the tensor writes.
    summed_report_keys: tuple[str, ...] = ()

    def option_classes(self) -> tuple[type, ...]:
        if isinstance(self.options, OptionVariants):
            return tuple(self.options.classes.values())
        return (self.options,)

    def options_class(self, given: Mapping[str, Any]) -> type:
        if isinstance(self.options, OptionVariants):
            return self.options.pick(given)
        return self.options


def option_fields(options_class: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(options_class)}


_methods: dict[str, MergeMethod] = {}
_reserved: dict[str, str] = {}  # names no method option may take, and who holds them
_loaded = False


def reserve(names, holder: str) -> None:
    """Keeps option names from colliding with the keywords or flags of `holder` (the API)."""
    for name in names:
        _reserved.setdefault(name, holder)


def _same_option(a: dataclasses.Field, b: dataclasses.Field) -> bool:
    keys = ("kind", "choices", "check")
    return all(a.metadata[k] == b.metadata[k] for k in keys)


def register(method: MergeMethod) -> MergeMethod:
    """Adds `method` to the registry. A name registered twice, an option named like an API
    keyword, or an option another method declares with another type or range is a bug in the
    method's module: raised as such, not as a user error."""
    if method.name in _methods:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    known = _known_options()
    for options_class in method.option_classes():
        for name, declared in option_fields(options_class).items():
            if name in _reserved:
                raise ValueError(
                    f"method {method.name!r}: option {name!r} is taken by {_reserved[name]}"
                )
            if name in known and not _same_option(known[name], declared):
                raise ValueError(
                    f"method {method.name!r}: option {name!r} differs in type or range from "
                    "another method's option of that name"
                )
    _methods[method.name] = method
    return method


def _known_options() -> dict[str, dataclasses.Field]:
    known = {}
    for method in _methods.values():
        for options_class in method.option_classes():
            known.update(option_fields(options_class))
    return known


def _load() -> None:
    """Imports this package's method modules, then the entry points' (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__package__}.{module.name}")
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()


def method_names() -> tuple[str, ...]:
    """Every registered method: the default first, then by name."""
    _load()
    return tuple(sorted(_methods, key=lambda name: (name != DEFAULT_METHOD, name)))


def default_runnable_names() -> tuple[str, ...]:
    """The methods a comparison of "every method" runs with their defaults (the detector
    benchmark)."""
    return tuple(name for name in method_names() if _methods[name].runs_with_defaults)


def get_method(name: str) -> MergeMethod | None:
    _load()
    return _methods.get(name)


def method_options() -> dict[str, dict[str, dataclasses.Field]]:
    """For every option name any method declares: the methods declaring it, with their field
    (for the variants of one method, keyed "dare" and "dare with dare_combine=ties")."""
    catalogue: dict[str, dict[str, dataclasses.Field]] = {}
    for name in method_names():
        method = _methods[name]
        for options_class in method.option_classes():
            label = name
            if isinstance(method.options, OptionVariants) and options_class is not (
                method.options.pick({})
            ):
                value = next(v for v, c in method.options.classes.items() if c is options_class)
                label = f"{name} with {method.options.selector}={value}"
            for option_name, declared in option_fields(options_class).items():
                catalogue.setdefault(option_name, {})[label] = declared
    return catalogue
