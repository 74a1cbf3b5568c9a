"""TensorSource: one model a merge reads (its base or an expert), whatever holds it. The engine
reads every input through this interface alone: names, shapes and dtypes first (headers only),
then tensors, or blocks of their rows, on demand.

Two sources exist: a checkpoint on disk (io/checkpoint.py) and a state dict in memory
(`StateDictSource`). `open_source` picks the reader of a path by what is on disk, asking each
registered `SourceFormat` in turn (the most specific first), so a new kind of input (an adapter
directory, a rank's share of a model) is one more registered reader, not another branch here."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from r2m_ext.errors import R2MError

TensorMeta = tuple[tuple[int, ...], torch.dtype]


class TensorSource(Protocol):
    label: str  # how messages name the model (its path, or "expert 2")
    files: list[Path]  # the files its tensors live in (none in memory)
    files_read: list[Path]  # every file it reads: those, and indexes (kept apart from outputs)
    directory: Path | None  # the model's directory, whose config files a merge copies

    def metadata(self) -> dict[str, TensorMeta]:
        """Every tensor's shape and dtype, in the model's own order."""

    def read(self, name: str, rows: slice | None = None, pinned: bool = False) -> torch.Tensor:
        """Tensor `name`, or rows [start, stop) of its first dimension (in page-locked host
        memory when `pinned`, for copies to a GPU)."""

    def where(self, name: str) -> str:
        """The file (or label) that holds `name`, for messages."""

    def close(self) -> None: ...


class StateDictSource:
    """A state dict in memory as a TensorSource."""

    def __init__(self, state: Mapping[str, torch.Tensor], label: str):
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise R2MError(f"{label}: entry {name!r} is a {type(value).__name__}, not a tensor")
        self._state = state
        self.label = label
        self.files: list[Path] = []
        self.files_read: list[Path] = []
        self.directory = None

    def metadata(self) -> dict[str, TensorMeta]:
        return {name: (tuple(value.shape), value.dtype) for name, value in self._state.items()}

    def read(self, name: str, rows: slice | None = None, pinned: bool = False) -> torch.Tensor:
        tensor = self._state[name] if rows is None else self._state[name][rows]
        return tensor.pin_memory() if pinned and tensor.device.type == "cpu" else tensor

    def where(self, name: str) -> str:
        return self.label

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class SourceFormat:
    """A kind of model on disk: `recognizes(path)` looks at what is there (never trusting a
    name alone), `open(path, buffers, allow_external_shards)` returns its TensorSource."""

    name: str
    recognizes: Callable[[Path], bool]
    open: Callable[..., TensorSource]
    # Whether it is read on top of the merge's base (a LoRA adapter): opened with `base=`.
    needs_base: bool = False


_FORMATS: list[SourceFormat] = []


def register_source_format(source_format: SourceFormat, fallback: bool = False) -> None:
    """Adds a reader, asked before those registered earlier unless it is the `fallback` (the
    dense checkpoint, which takes any file or directory and says what is wrong with it)."""
    if fallback:
        _FORMATS.append(source_format)
    else:
        _FORMATS.insert(0, source_format)


def open_source(path: str | Path, base: TensorSource | None = None, **options) -> TensorSource:
    """The model at `path`, read by the first registered format that recognises it; `base`, the
    merge's base, for a format read on top of it (None when `path` is the base)."""
    path = Path(path)
    for source_format in _FORMATS:
        if source_format.recognizes(path):
            if source_format.needs_base:
                return source_format.open(path, base)
            return source_format.open(path, **options)
    raise AssertionError("the dense checkpoint reader recognises every path")
