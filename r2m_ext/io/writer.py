"""Writes a merged model as safetensors shards, streaming: each shard's header is written first
(every output shape is known before the merge starts), then tensors, or row blocks of them, are
appended as they are produced, so the writer holds no tensor of its own.

Everything goes into a partial directory beside the target, `.NAME.r2m-partial`, and is renamed
into place only when complete, after fsync. On an error the partial directory is removed; on an
interruption (Ctrl-C, SIGTERM) the shards completed so far are kept with a progress file, so
`--resume` with the same recipe continues from there and produces the identical output."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path

import torch

from r2m_ext.errors import R2MError
from r2m_ext.io.safetensors_format import header_bytes, tensor_bytes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROGRESS_FILE = "r2m_progress.json"
# Fault injection for the resume tests: a real SIGINT to this process once this many shards of
# the run are complete.
INTERRUPT_AFTER_SHARDS_ENV = "R2M_TEST_INTERRUPT_AFTER_SHARDS"
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

Layout = Sequence[tuple[str, Sequence[int], torch.dtype]]


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


def plan_shards(layout: Layout, shard_size: int) -> list[list[str]]:
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


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.r2m-partial"


def _write_all(fd: int, data: memoryview) -> None:
    """os.write may write less than asked (large buffers, signals): loop until all is out."""
    data = data.cast("B")
    while data:
        data = data[os.write(fd, data) :]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Use as a context manager around the merge. `identity` describes the run (the recipe): a
    partial output is only resumed by a run with the same identity."""

    def __init__(
        self, out: Path, layout: Layout, shard_size: int, identity: dict, resume: bool = False
    ):
        self.out = Path(out)
        self.tmp = partial_dir(self.out)
        self._identity = identity
        self._resume = resume
        self._meta = {name: (tuple(int(s) for s in shape), dtype) for name, shape, dtype in layout}
        self._shards = plan_shards(layout, shard_size)
        total = len(self._shards)
        self._shard_names = (
            [SINGLE_FILE]
            if total == 1
            else [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
        )
        self._shard_of = {name: i for i, shard in enumerate(self._shards) for name in shard}
        self.complete: set[int] = set()
        self.resumed = 0  # shards a resumed run found complete
        self._open = None  # (shard index, file object, {name: bytes still to come})
        self._files: list[Path] = []

    @property
    def done_names(self) -> set[str]:
        """Tensors already in complete shards of a resumed run: nothing needs to produce them."""
        return {name for i in self.complete for name in self._shards[i]}

    def __enter__(self) -> ShardWriter:
        try:
            if self.tmp.exists() and self._resume:
                self._load_progress()
            else:
                if self.tmp.exists():
                    raise R2MError(
                        f"an interrupted merge into {self.out} left {self.tmp}; pass --resume to "
                        "continue it, or --overwrite to start over"
                    )
                self.out.parent.mkdir(parents=True, exist_ok=True)
                self.tmp.mkdir()
                self._save_progress()
        except OSError as error:
            raise R2MError(
                f"{self.out}: cannot create output ({error.strerror or error})"
            ) from None
        return self

    def _progress_path(self) -> Path:
        return self.tmp / PROGRESS_FILE

    def _save_progress(self) -> None:
        state = {"identity": self._identity, "complete": sorted(self.complete)}
        staging = self.tmp / (PROGRESS_FILE + ".new")
        staging.write_text(json.dumps(state, indent=1))
        os.replace(staging, self._progress_path())

    def _load_progress(self) -> None:
        try:
            state = json.loads(self._progress_path().read_text())
        except (OSError, ValueError):
            raise R2MError(
                f"{self.tmp}: no readable {PROGRESS_FILE}; pass --overwrite to start over"
            ) from None
        if state.get("identity") != self._identity:
            theirs, ours = state.get("identity") or {}, self._identity
            differing = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise R2MError(
                f"{self.tmp} was written by a different merge ({', '.join(differing)} differ); "
                "resume with the same recipe, or pass --overwrite to start over"
            )
        for index in state.get("complete", []):
            path = self.tmp / self._shard_names[index]
            layout = [(n, *self._meta[n]) for n in self._shards[index]]
            expected = len(header_bytes(layout)) + sum(
                tensor_nbytes(*self._meta[n]) for n in self._shards[index]
            )
            if path.is_file() and path.stat().st_size == expected:
                self.complete.add(index)
                self._files.append(path)
        for path in self.tmp.glob("*.safetensors"):
            if path not in self._files:
                path.unlink()
        self.resumed = len(self.complete)

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            try:
                self._commit()
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        elif issubclass(exc_type, KeyboardInterrupt):
            self._close_incomplete()
        else:
            self._close_incomplete()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _close_incomplete(self) -> None:
        if self._open is not None:
            index, fd, _ = self._open
            os.close(fd)
            (self.tmp / self._shard_names[index]).unlink(missing_ok=True)
            self._open = None

    def write(self, name: str, block: torch.Tensor) -> None:
        """Appends `block`: tensor `name` whole, or its next rows. Tensors come in layout order."""
        shape, dtype = self._meta[name]
        if block.dtype != dtype or tuple(block.shape[1:]) != shape[1:]:
            raise R2MError(
                f"internal error: {name!r} block is {tuple(block.shape)} {block.dtype}, "
                f"planned {shape} {dtype}"
            )
        shard = self._shard_of[name]
        if self._open is None or self._open[0] != shard:
            self._start_shard(shard)
        _, fd, remaining = self._open
        data = tensor_bytes(block)
        if len(data) > remaining.get(name, 0):
            raise R2MError(f"internal error: more data for {name!r} than planned")
        self._guarded(lambda: _write_all(fd, data))
        remaining[name] -= len(data)
        if remaining[name] == 0:
            del remaining[name]
        if not remaining:
            self._finish_shard()

    def _start_shard(self, shard: int) -> None:
        if self._open is not None:
            raise R2MError(f"internal error: shard {self._open[0]} left incomplete")
        path = self.tmp / self._shard_names[shard]
        layout = [(n, *self._meta[n]) for n in self._shards[shard]]
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = self._guarded(lambda: os.open(path, flags, 0o644))
        self._open = (shard, fd, {n: tensor_nbytes(*self._meta[n]) for n in self._shards[shard]})
        self._guarded(lambda: _write_all(fd, memoryview(header_bytes(layout))))

    def _finish_shard(self) -> None:
        shard, fd, _ = self._open
        self._guarded(lambda: os.fsync(fd))
        os.close(fd)
        self._open = None
        self.complete.add(shard)
        self._files.append(self.tmp / self._shard_names[shard])
        self._guarded(self._save_progress)
        if os.environ.get(INTERRUPT_AFTER_SHARDS_ENV) == str(len(self.complete)):
            os.kill(os.getpid(), signal.SIGINT)

    def _guarded(self, action):
        try:
            return action()
        except OSError as error:
            raise R2MError(f"{self.out}: write failed ({error.strerror or error})") from None

    def add_file(self, name: str, text: str) -> None:
        path = self.tmp / name
        self._guarded(lambda: path.write_text(text))
        self._files.append(path)

    def copy_file(self, source: Path) -> None:
        path = self.tmp / source.name
        self._guarded(lambda: shutil.copyfile(source, path))
        self._files.append(path)

    def _commit(self) -> None:
        missing = [self._shard_names[i] for i in range(len(self._shards)) if i not in self.complete]
        if missing:
            raise R2MError(f"internal error: shards never completed: {', '.join(missing[:3])}")
        if len(self._shards) > 1:
            total_size = sum(tensor_nbytes(*meta) for meta in self._meta.values())
            index = {
                "metadata": {"total_size": total_size},
                "weight_map": {n: self._shard_names[s] for n, s in self._shard_of.items()},
            }
            self.add_file(INDEX_FILE, json.dumps(index, indent=2) + "\n")
        self._progress_path().unlink()
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
