"""Reads a model from disk, one tensor at a time where the format allows: a .safetensors file, a
Hugging Face directory (sharded with model.safetensors.index.json, or a single file), or a
pickled .bin/.pt/.pth (loaded with weights_only=True only, never arbitrary pickles).
Knows no merge math.

Everything read from a file is treated as hostile: a file is read with the loader its content
calls for (never its name), an index may only name shards inside the model's directory, and
only regular files are opened (a FIFO or a device would block or never end)."""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from r2m_ext.errors import R2MError
from r2m_ext.io.buffers import HostBuffers
from r2m_ext.io.paths import is_within, kind_name, require_regular_file, resolved, stat_path
from r2m_ext.io.safetensors_format import DTYPE_CODES, MAX_HEADER_BYTES, SafetensorsFile
from r2m_ext.io.source import SourceFormat, TensorMeta, register_source_format

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# How torch.save's two formats begin: a zip archive (the default since torch 1.6), or a bare
# pickle of protocol 2 to 5 (the legacy format).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOLS = range(2, 6)
# The flag that lets an index name shards outside the model's directory.
EXTERNAL_SHARDS_FLAG = "--allow-external-shards"


class Checkpoint:
    """One dense model on disk, a TensorSource. `metadata()` reads headers only; `read(name)`
    reads one tensor (or a block of its rows) from disk each time it is called."""

    def __init__(
        self,
        path: str | Path,
        buffers: HostBuffers | None = None,
        allow_external_shards: bool = False,
    ):
        """`buffers`: where tensor reads get their memory (default: a new allocation each).
        `allow_external_shards`: let an index name shards outside the model's directory."""
        self.path = Path(path)
        self._buffers = buffers
        self._allow_external_shards = allow_external_shards
        self.label = str(path)
        found = stat_path(self.path)
        if found is None:
            raise R2MError(f"{self.label}: no such file or directory")
        if not (stat.S_ISDIR(found.st_mode) or stat.S_ISREG(found.st_mode)):
            raise R2MError(
                f"{self.label}: is a {kind_name(found.st_mode)}, not a checkpoint file or directory"
            )
        self.directory = self.path if stat.S_ISDIR(found.st_mode) else None
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, SafetensorsFile] = {}
        self._pickled: dict[Path, Mapping[str, torch.Tensor]] = {}
        self._meta: dict[str, TensorMeta] = {}
        # (index path, weight map) of a sharded directory: each shard must hold what it lists.
        self._index: tuple[Path, dict[str, str]] | None = None
        for file in self._weight_files():
            self._index_file(file)
        if not self._meta:
            raise R2MError(f"{self.label}: holds no tensors")

    def _weight_files(self) -> list[Path]:
        if self.directory is None:
            return [self.path]
        for index_name in (SAFETENSORS_INDEX, PICKLE_INDEX):
            index = self.directory / index_name
            if stat_path(index, follow_symlinks=False) is not None:
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
        require_regular_file(index, "index")
        try:
            document = json.loads(index.read_bytes().decode("utf-8"))
        except OSError as error:
            raise R2MError(f"{index}: cannot read ({error.strerror or error})") from None
        except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
            reason = str(error).splitlines()[0] if str(error) else "nested too deeply"
            raise R2MError(f"{index}: not a valid checkpoint index ({reason})") from None
        weight_map = document.get("weight_map") if isinstance(document, dict) else None
        if not isinstance(weight_map, dict):
            raise R2MError(f"{index}: not a valid checkpoint index (no weight_map object)")
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or "\x00" in shard:
                raise R2MError(
                    f"{index}: weight_map gives tensor {name!r} the shard {shard!r}, "
                    "not a file name"
                )
        root = _model_root(resolved(self.directory))
        paths = []
        for shard in dict.fromkeys(weight_map.values()):
            path = self.directory / shard
            if not self._allow_external_shards and not is_within(resolved(path), root):
                raise R2MError(
                    f"{index}: shard {shard!r} lies outside {root}; refusing to read it "
                    f"(pass {EXTERNAL_SHARDS_FLAG} if that is where it belongs)"
                )
            if stat_path(path) is None:
                raise R2MError(f"{path}: shard listed in {index} is missing")
            paths.append(path)
        self._index = (index, weight_map)
        return paths

    def _index_file(self, file: Path) -> None:
        require_regular_file(file, "weight file")
        if _holds_safetensors(file):
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
            if file.name.endswith(".safetensors"):
                # torch.load picks the safetensors loader by this name; the content is torch's.
                with open(file, "rb") as handle:
                    state = torch.load(handle, map_location="cpu", weights_only=True)
            else:
                state = _load_pickled_mapped(file)
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
            if not isinstance(name, str):
                raise R2MError(f"{file}: key {name!r} is a {type(name).__name__}, not a string")
            if not isinstance(value, torch.Tensor):
                raise R2MError(f"{file}: entry {name!r} is a {type(value).__name__}, not a tensor")
            if value.layout != torch.strided or value.is_meta or value.is_quantized:
                kind = "meta" if value.is_meta else str(value.layout).replace("torch.", "")
                raise R2MError(
                    f"{file}: tensor {name!r} is a {kind} tensor; only dense tensors with data "
                    "can be merged"
                )
            if value.dtype not in DTYPE_CODES:
                raise R2MError(
                    f"{file}: tensor {name!r} has dtype {value.dtype}, which a safetensors "
                    "output cannot hold"
                )
        return state

    def metadata(self) -> dict[str, TensorMeta]:
        return dict(self._meta)

    def where(self, name: str) -> str:
        return str(self._file_of[name])

    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(self._file_of.values()))

    @property
    def files_read(self) -> list[Path]:
        """Every file this checkpoint reads: its weight files and its index."""
        return self.files + ([self._index[0]] if self._index is not None else [])

    def read(self, name: str, rows: slice | None = None, pinned: bool = False) -> torch.Tensor:
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


def _load_pickled_mapped(file: Path):
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        # Legacy (pre-zip) serialization cannot be memory-mapped.
        return torch.load(file, map_location="cpu", weights_only=True)


def _model_root(directory: Path) -> Path:
    """Where a model directory's files may live: the directory itself, or for a snapshot in the
    Hugging Face cache (REPO/snapshots/REVISION, files linked to REPO/blobs/) the cached repo."""
    repo = directory.parent.parent
    if directory.parent.name == "snapshots" and (repo / "blobs").is_dir():
        return repo
    return directory


def _holds_safetensors(file: Path) -> bool:
    """True unless the content is one of torch.save's formats, whatever the file's name. A
    safetensors file begins with its header's length; a bare pickle's first bytes can read as
    one, so they count as safetensors only where that length fits the file and the header
    starts as JSON."""
    try:
        with open(file, "rb") as handle:
            head = handle.read(9)
            size = os.fstat(handle.fileno()).st_size
    except OSError as error:
        raise R2MError(f"{file}: cannot read ({error.strerror or error})") from None
    if head.startswith(_ZIP_MAGIC):
        return False
    if len(head) == 9 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:
        (header_len,) = struct.unpack("<Q", head[:8])
        fits = header_len <= min(MAX_HEADER_BYTES, size - 8)
        return fits and head[8:9] in (b"{", b" ", b"\t", b"\r", b"\n")
    return True


register_source_format(
    SourceFormat("checkpoint", recognizes=lambda path: True, open=Checkpoint), fallback=True
)
