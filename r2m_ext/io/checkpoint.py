"""Reads a model from disk, one tensor at a time where the format allows: a .safetensors file, a
Hugging Face directory (sharded with model.safetensors.index.json, or a single file), or a
pickled .bin/.pt/.pth (loaded with weights_only=True only, never arbitrary pickles).
Knows no merge math."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from r2m_ext.errors import R2MError
from r2m_ext.io.buffers import HostBuffers
from r2m_ext.io.safetensors_format import SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"

TensorMeta = tuple[tuple[int, ...], torch.dtype]


class Checkpoint:
    """One model on disk. `metadata()` reads headers only; `load(name)` reads one tensor (or a
    block of its rows) from disk each time it is called."""

    def __init__(self, path: str | Path, buffers: HostBuffers | None = None):
        """`buffers`: where tensor reads get their memory (default: a new allocation each)."""
        self.path = Path(path)
        self._buffers = buffers
        self.label = str(path)
        if not self.path.exists():
            raise R2MError(f"{self.label}: no such file or directory")
        self.directory = self.path if self.path.is_dir() else None
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, SafetensorsFile] = {}
        self._pickled: dict[Path, Mapping[str, torch.Tensor]] = {}
        self._meta: dict[str, TensorMeta] = {}
        # (index path, weight map) of a sharded directory: each shard must hold what it lists.
        self._index: tuple[Path, dict[str, str]] | None = None
        for file in self._weight_files():
            self._index_file(file)

    def _weight_files(self) -> list[Path]:
        if self.directory is None:
            if self.path.suffix != ".safetensors" and self.path.suffix not in PICKLE_SUFFIXES:
                raise R2MError(
                    f"{self.label}: unknown checkpoint format (expected .safetensors, "
                    f"{', '.join(PICKLE_SUFFIXES)} or a Hugging Face model directory)"
                )
            return [self.path]
        for index_name in (SAFETENSORS_INDEX, PICKLE_INDEX):
            index = self.directory / index_name
            if index.exists():
                return self._files_from_index(index)
        singles = sorted(self.directory.glob("*.safetensors")) or sorted(
            p for suffix in PICKLE_SUFFIXES for p in self.directory.glob(f"*{suffix}")
        )
        if len(singles) == 1:
            return singles
        if not singles:
            raise R2MError(f"{self.label}: directory holds no .safetensors, .bin, .pt or .pth file")
        raise R2MError(
            f"{self.label}: directory holds {len(singles)} weight files but no index "
            f"({SAFETENSORS_INDEX}); pass one file"
        )

    def _files_from_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise R2MError(f"{index}: not a valid checkpoint index ({error})") from None
        paths = [self.directory / name for name in files]
        for path in paths:
            if not path.is_file():
                raise R2MError(f"{path}: shard listed in {index} is missing")
        self._index = (index, weight_map)
        return paths

    def _index_file(self, file: Path) -> None:
        if file.suffix == ".safetensors":
            handle = SafetensorsFile(file, self._buffers)
            metas = {name: (shape, dtype) for name, (dtype, shape, _, _) in handle.entries.items()}
            self._handles[file] = handle
        else:
            state = self._load_pickled(file)
            self._pickled[file] = state
            metas = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
        for name, meta in metas.items():
            if name in self._file_of:
                raise R2MError(f"{file}: tensor {name!r} is also in {self._file_of[name]}")
            self._file_of[name] = file
            self._meta[name] = meta
        if self._index is not None:
            index, weight_map = self._index
            listed = {n for n, f in weight_map.items() if self.directory / f == file}
            if listed != set(metas):
                missing = sorted(listed - set(metas))
                extra = sorted(set(metas) - listed)
                detail = f"lacks {missing[0]!r}" if missing else f"holds unlisted {extra[0]!r}"
                raise R2MError(f"{file}: does not match {index} (the shard {detail})")

    def _load_pickled(self, file: Path) -> Mapping[str, torch.Tensor]:
        try:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                # Legacy (pre-zip) serialization cannot be memory-mapped.
                state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch raises many types for bad pickles
            first_line = (
                str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            )
            raise R2MError(f"{file}: cannot load with weights_only=True ({first_line})") from None
        if isinstance(state, Mapping) and not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            for wrapper in ("state_dict", "model", "module"):
                if isinstance(state.get(wrapper), Mapping):
                    state = state[wrapper]
                    break
        if not isinstance(state, Mapping):
            raise R2MError(f"{file}: holds a {type(state).__name__}, not a state dict")
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise R2MError(f"{file}: entry {name!r} is a {type(value).__name__}, not a tensor")
        return state

    def metadata(self) -> dict[str, TensorMeta]:
        return dict(self._meta)

    def file_of(self, name: str) -> str:
        return str(self._file_of[name])

    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(self._file_of.values()))

    def load(self, name: str, rows: slice | None = None, pinned: bool = False) -> torch.Tensor:
        """Tensor `name`, or rows [start, stop) of its first dimension (in page-locked memory
        when `pinned`)."""
        file = self._file_of[name]
        if file in self._pickled:
            tensor = self._pickled[file][name]
            tensor = tensor if rows is None else tensor[rows]
            return tensor.pin_memory() if pinned else tensor
        return self._handles[file].read(name, rows, pinned)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
