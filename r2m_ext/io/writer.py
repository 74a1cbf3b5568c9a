"""Writes a merged model as safetensors shards, atomically: everything goes into a temporary
directory beside the target, is fsynced, and is renamed into place only when complete. Any failure
(bad input found late, a full disk, Ctrl-C) removes the temporary directory and leaves no output."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from r2m_ext.errors import R2MError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5 * 10**9 (decimal units as Hugging Face uses them; KiB/MiB/GiB are binary)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise R2MError(f"cannot read size {text!r}; write e.g. 500MB, 5GB or 2GiB")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise R2MError(f"size {text!r} must be positive")
    return value


def tensor_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count * dtype.itemsize


def plan_shards(
    layout: Sequence[tuple[str, Sequence[int], torch.dtype]], shard_size: int
) -> list[list[str]]:
    """Consecutive tensors grouped greedily into shards of at most `shard_size` bytes (a larger
    tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, shape, dtype in layout:
        size = tensor_nbytes(shape, dtype)
        if shards[-1] and filled + size > shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards if shards[0] else []


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Collects tensors in layout order and writes each shard as soon as it is complete.

    Use as a context manager: leaving the block normally commits (renames into place), leaving it
    by an exception removes everything written."""

    def __init__(
        self,
        out: Path,
        layout: Sequence[tuple[str, Sequence[int], torch.dtype]],
        shard_size: int,
    ):
        self.out = Path(out)
        self._layout = {name: (tuple(shape), dtype) for name, shape, dtype in layout}
        shards = plan_shards(layout, shard_size)
        if len(shards) == 1:
            self._shard_names = [SINGLE_FILE]
        else:
            total = len(shards)
            self._shard_names = [
                f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)
            ]
        self._shards = shards
        self._shard_of = {name: i for i, shard in enumerate(shards) for name in shard}
        self._pending: list[dict[str, torch.Tensor]] = [{} for _ in shards]
        self._written: set[int] = set()
        self._files: list[Path] = []
        self.tmp = self.out.parent / f".{self.out.name}.r2m-partial-{os.getpid()}"

    def __enter__(self) -> ShardWriter:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        except OSError as error:
            raise R2MError(
                f"{self.out}: cannot create output ({error.strerror or error})"
            ) from None
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            try:
                self._commit()
            except BaseException:
                self._abort()
                raise
        else:
            self._abort()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        shape, dtype = self._layout[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise R2MError(
                f"internal error: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"planned {shape} {dtype}"
            )
        shard = self._shard_of[name]
        self._pending[shard][name] = tensor.detach().to("cpu").contiguous()
        if len(self._pending[shard]) == len(self._shards[shard]):
            self._write_shard(shard)

    def add_file(self, name: str, text: str) -> None:
        self._guarded(self.tmp / name, lambda path: path.write_text(text))

    def copy_file(self, source: Path) -> None:
        self._guarded(self.tmp / source.name, lambda path: shutil.copyfile(source, path))

    def _guarded(self, path: Path, write) -> None:
        try:
            write(path)
        except (OSError, SafetensorError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise R2MError(f"{self.out / path.name}: write failed ({reason})") from None
        self._files.append(path)

    def _write_shard(self, shard: int) -> None:
        tensors = {name: self._pending[shard][name] for name in self._shards[shard]}
        path = self.tmp / self._shard_names[shard]
        self._guarded(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        self._pending[shard] = {}
        self._written.add(shard)

    def _commit(self) -> None:
        unwritten = [i for i in range(len(self._shards)) if i not in self._written]
        if unwritten:
            names = [n for i in unwritten for n in self._shards[i] if n not in self._pending[i]]
            raise R2MError(f"internal error: planned tensors never written, e.g. {names[:3]}")
        if len(self._shards) > 1:
            total_size = sum(tensor_nbytes(*meta) for meta in self._layout.values())
            index = {
                "metadata": {"total_size": total_size},
                "weight_map": {n: self._shard_names[s] for n, s in self._shard_of.items()},
            }
            self.add_file(INDEX_FILE, json.dumps(index, indent=2) + "\n")
        replaced = None
        try:
            for path in self._files:
                _fsync_path(path)
            _fsync_path(self.tmp)
            if self.out.exists():
                replaced = self.out.parent / f".{self.out.name}.r2m-replaced-{os.getpid()}"
                os.rename(self.out, replaced)
            os.rename(self.tmp, self.out)
            _fsync_path(self.out.parent)
        except OSError as error:
            if replaced is not None and not self.out.exists():
                os.rename(replaced, self.out)  # put the previous output back
            raise R2MError(
                f"{self.out}: cannot finish output ({error.strerror or error})"
            ) from None
        if replaced is not None:
            shutil.rmtree(replaced) if replaced.is_dir() else replaced.unlink()

    def _abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
