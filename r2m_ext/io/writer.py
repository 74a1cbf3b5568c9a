"""Writes a merged model as safetensors shards, streaming: each shard's header is written first
(every output shape is known before the merge starts), then tensors, or row blocks of them, are
appended as they are produced, so the writer holds no tensor of its own.

Everything goes into a partial directory beside the target, `.NAME.r2m-partial`, and is renamed
into place only when complete, after fsync, with a manifest of what it holds (io/output.py says
what may be replaced). On an error the partial directory is removed; on an
interruption (Ctrl-C, SIGTERM) the shards completed so far are kept with a progress file, so
`--resume` with the same recipe continues from there and produces the identical output.

With a write-behind allowance, a writer thread does the writing and the fsyncs while the merge
computes the next tensors; the blocks it has not written yet are held within that allowance.

On several ranks of a distributed merge (engine/ranks.py) every rank writes its own tensors into
the same shard files, each at its place (every offset follows from the layout), and records what
it has written and fsynced in a progress file of its own; rank 0 alone creates, resumes and
publishes the partial directory, once every rank has said its share is on disk. A resumed merge,
on any number of ranks, keeps the shards that every rank together completed."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import torch

from r2m_ext.engine.ranks import RankLost, Ranks
from r2m_ext.errors import R2MError
from r2m_ext.io.output import (
    MANIFEST_FILE,
    check_output_target,
    manifest_text,
    partial_dir,
    remove_replaced,
)
from r2m_ext.io.safetensors_format import header_bytes, tensor_bytes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROGRESS_FILE = "r2m_progress.json"
# What one rank of a distributed merge wrote: r2m_progress-rank-K.json.
RANK_PROGRESS_PATTERN = "r2m_progress-rank-*.json"
# Fault injection for the resume tests: a real SIGINT to this process once this many shards of
# the run are complete.
INTERRUPT_AFTER_SHARDS_ENV = "R2M_TEST_INTERRUPT_AFTER_SHARDS"
# For the distributed tests, "RANK:K": that rank kills itself (SIGKILL, no cleanup) once it has
# written its part of K shards.
KILL_RANK_AFTER_SHARDS_ENV = "R2M_TEST_KILL_RANK_AFTER_SHARDS"
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

# Sizes are byte counts in int64 (and mixed with float shares of the budget).
_MAX_SIZE = 2**63

Layout = Sequence[tuple[str, Sequence[int], torch.dtype]]


def parse_size(text: str | int, allow_zero: bool = False) -> int:
    """'5GB' -> 5 * 10**9 (decimal units as Hugging Face uses them; KiB/MiB/GiB are binary);
    0 in any unit only with `allow_zero` (a size that can be turned off)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise R2MError(f"cannot read size {text!r}; write e.g. 500MB, 5GB or 2GiB")
        value = int(Fraction(match.group(1)) * _SIZE_UNITS[unit])
    if value < 0 or (value == 0 and not allow_zero):
        raise R2MError(f"size {text!r} must be {'0 or more' if allow_zero else 'positive'}")
    if value >= _MAX_SIZE:
        raise R2MError(f"size {text!r} is beyond 2**63 bytes, more than any machine holds")
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


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    """`data` at `offset` of the file. os.pwrite may write less than asked (large buffers,
    signals): loop until all is out."""
    data = data.cast("B")
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _load_sync_file_range():
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux / glibc: the final fsync does all the work
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int) -> None:
    """Asks the kernel to start writing the file's dirty pages to disk now, without waiting, so
    that the fsync closing the shard finds little left to do (ViT-L/14 x 8 average: 3.8 to 3.5 s
    in merge_files). A hint: its errors surface, if at all, from that fsync."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Use as a context manager around the merge. `identity` describes the run (the recipe): a
    partial output is only resumed by a run with the same identity. `write_behind` bytes of
    blocks may wait for the writer thread (0: every write is done before `write` returns)."""

    def __init__(
        self,
        out: Path,
        layout: Layout,
        shard_size: int,
        identity: dict,
        resume: bool = False,
        write_behind: int = 0,
        overwrite: bool = False,
        ranks: Ranks | None = None,
        single_file: str = SINGLE_FILE,
    ):
        self.out = Path(out)
        self._ranks = Ranks() if ranks is None else ranks
        self._overwrite = overwrite
        self.tmp = partial_dir(self.out)
        self._identity = identity
        self._resume = resume
        self._meta = {name: (tuple(int(s) for s in shape), dtype) for name, shape, dtype in layout}
        self._shards = plan_shards(layout, shard_size)
        total = len(self._shards)
        self._shard_names = (
            [single_file]
            if total == 1
            else [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
        )
        self._shard_of = {name: i for i, shard in enumerate(self._shards) for name in shard}
        # Where each tensor's bytes start in its shard file: after the header, in layout order.
        self._offset: dict[str, int] = {}
        for shard in self._shards:
            offset = len(header_bytes([(n, *self._meta[n]) for n in shard]))
            for name in shard:
                self._offset[name] = offset
                offset += tensor_nbytes(*self._meta[name])
        self.written_here: list[str] = []  # tensors this rank wrote and fsynced (ranks only)
        self._shares_done = 0  # shards this rank wrote its part of (ranks only)
        self.complete: set[int] = set()
        self.resumed = 0  # shards a resumed run found complete
        self._open = None  # (shard index, file object, {name: bytes still to come})
        self._files: list[Path] = []
        # Once writes are queued, the writer thread alone touches the files and the fields
        # above; the caller's thread waits for it (_drain) before it touches them again.
        self._write_behind = write_behind
        self._thread = (
            ThreadPoolExecutor(1, thread_name_prefix="r2m-write") if write_behind > 0 else None
        )
        self._queued: deque[tuple[Future, int]] = deque()
        self.queued_bytes = 0  # held by blocks not yet written
        self._failure: BaseException | None = None
        self._abandoned = False  # set on an error or interruption: queued writes are skipped

    @property
    def done_names(self) -> set[str]:
        """Tensors already in complete shards of a resumed run: nothing needs to produce them."""
        return {name for i in self.complete for name in self._shards[i]}

    def __enter__(self) -> ShardWriter:
        """Rank 0 (a merge on its own is rank 0) creates the partial directory, or resumes it;
        the other ranks learn from it which shards are complete."""
        prepare = self._prepare if self._ranks.rank == 0 else lambda: None
        complete = self._ranks.exchange(prepare)[0]
        if self._ranks.rank != 0:
            self.complete = set(complete)
            self.resumed = len(self.complete)
        return self

    def _prepare(self) -> list[int]:
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
        return sorted(self.complete)

    def _progress_path(self) -> Path:
        return self.tmp / PROGRESS_FILE

    def _rank_progress_path(self) -> Path:
        return self.tmp / RANK_PROGRESS_PATTERN.replace("*", str(self._ranks.rank))

    def _save_rank_progress(self) -> None:
        state = {"identity": self._identity, "tensors": self.written_here}
        path = self._rank_progress_path()
        staging = path.with_name(path.name + ".new")
        staging.write_text(json.dumps(state, indent=1))
        os.replace(staging, path)

    def _save_progress(self) -> None:
        state = {"identity": self._identity, "complete": sorted(self.complete)}
        staging = self.tmp / (PROGRESS_FILE + ".new")
        staging.write_text(json.dumps(state, indent=1))
        os.replace(staging, self._progress_path())

    def _load_progress(self) -> None:
        unreadable = R2MError(
            f"{self.tmp}: no readable {PROGRESS_FILE}; pass --overwrite to start over"
        )
        try:
            state = json.loads(self._progress_path().read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            raise unreadable from None
        complete = state.get("complete") if isinstance(state, dict) else None
        if not isinstance(complete, list) or not isinstance(state.get("identity"), dict):
            raise unreadable
        if state["identity"] != self._identity:
            theirs, ours = state["identity"], self._identity
            differing = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise R2MError(
                f"{self.tmp} was written by a different merge ({', '.join(differing)} differ); "
                "resume with the same recipe, or pass --overwrite to start over"
            )
        for index in complete:
            if isinstance(index, bool) or not isinstance(index, int):
                raise unreadable
        written = {
            name
            for index in complete
            if 0 <= index < len(self._shards)
            for name in self._shards[index]
        }
        written |= self._tensors_ranks_wrote()
        for index, shard in enumerate(self._shards):
            if index in self.complete or not written.issuperset(shard):
                continue  # incomplete, or not a shard of this layout: written again
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
        # From here on the complete shards are those of the progress file alone.
        self._save_progress()
        for path in self.tmp.glob(RANK_PROGRESS_PATTERN):
            path.unlink()
        self.resumed = len(self.complete)

    def _tensors_ranks_wrote(self) -> set[str]:
        """Tensors the ranks of an interrupted distributed merge wrote and fsynced, from their
        progress files (each checked to come from this merge)."""
        written: set[str] = set()
        for path in sorted(self.tmp.glob(RANK_PROGRESS_PATTERN)):
            try:
                state = json.loads(path.read_bytes().decode("utf-8"))
            except (OSError, ValueError, RecursionError):
                continue  # torn by the interruption: its tensors are written again
            if not isinstance(state, dict) or state.get("identity") != self._identity:
                raise R2MError(
                    f"{path} was written by a different merge; resume with the same recipe, or "
                    "pass --overwrite to start over"
                )
            names = state.get("tensors")
            if isinstance(names, list):
                written.update(n for n in names if isinstance(n, str) and n in self._meta)
        return written

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._ranks.rank != 0:
            # Rank 0 publishes or removes the partial directory; this rank's share is on disk
            # (finish_share) or abandoned.
            self._stop_thread()
            self._close_incomplete()
            return
        if exc_type is None:
            try:
                self._drain()
                self._commit()
            except BaseException:
                self._stop_thread()
                self._close_incomplete()
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            self._stop_thread()
            return
        self._stop_thread()
        self._close_incomplete()
        # Kept for --resume after an interruption, or where a rank was lost (killed, its
        # machine gone): what the ranks completed is sound.
        if not issubclass(exc_type, (KeyboardInterrupt, RankLost)):
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the writer thread ---------------------------------------------------------------------
    def _submit(self, action: Callable[[], None], nbytes: int) -> None:
        """Runs `action` (which writes `nbytes` held bytes) on the writer thread, in order, after
        waiting until the blocks still queued and this one fit the write-behind allowance; a
        block larger than the whole allowance is written before this returns."""
        if self._thread is None:
            action()
            return
        while self._queued and self.queued_bytes + nbytes > self._write_behind:
            self._wait_oldest()
        self._raise_failure()
        self._queued.append((self._thread.submit(self._run_queued, action), nbytes))
        self.queued_bytes += nbytes
        if nbytes > self._write_behind:
            self._drain()

    def _run_queued(self, action: Callable[[], None]) -> None:
        if self._failure is not None or self._abandoned:
            return  # a write before this one failed, or the merge stopped: skip the rest
        try:
            action()
        except BaseException as error:  # handed to the caller's thread by _raise_failure
            self._failure = error

    def _wait_oldest(self) -> None:
        future, nbytes = self._queued[0]
        future.result()
        self._queued.popleft()
        self.queued_bytes -= nbytes

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            self._abandoned = True
            raise failure

    def _drain(self) -> None:
        """Waits until every queued write is done; raises the first one that failed."""
        while self._queued:
            self._wait_oldest()
        self._raise_failure()

    def _stop_thread(self) -> None:
        """After an error or interruption: skips queued writes, waits for the one under way (its
        file must not be closed under it) and ends the thread."""
        if self._thread is None:
            return
        self._abandoned = True
        self._thread.shutdown(wait=True, cancel_futures=True)
        self._thread = None
        self._queued.clear()
        self.queued_bytes = 0

    def _close_incomplete(self) -> None:
        if self._open is not None:
            index, fd, _ = self._open
            os.close(fd)
            if not self._ranks.distributed:  # on ranks, others' tensors may be in it
                (self.tmp / self._shard_names[index]).unlink(missing_ok=True)
            self._open = None

    def write(self, name: str, block: torch.Tensor) -> None:
        """Appends `block`: tensor `name` whole, or its next rows. Tensors come in layout order.
        With write-behind the block is written later and must not change meanwhile (the
        engine's blocks are fresh results or inputs it never writes to)."""
        shape, dtype = self._meta[name]
        if block.dtype != dtype or tuple(block.shape[1:]) != shape[1:]:
            raise AssertionError(
                f"{name!r} block is {tuple(block.shape)} {block.dtype}, planned {shape} {dtype}"
            )
        data = tensor_bytes(block)  # holds the block's memory until written
        self._submit(lambda: self._append(name, data), len(data))

    def _append(self, name: str, data: memoryview) -> None:
        shard = self._shard_of[name]
        if self._open is None or self._open[0] != shard:
            self._start_shard(shard)
        _, fd, remaining = self._open
        if len(data) > remaining.get(name, 0):
            raise AssertionError(f"more data for {name!r} than planned")
        offset = self._offset[name] + tensor_nbytes(*self._meta[name]) - remaining[name]
        self._guarded(lambda: _write_all(fd, data, offset))
        _start_writeback(fd)
        remaining[name] -= len(data)
        if remaining[name] == 0:
            del remaining[name]
        if not remaining:
            self._finish_shard()

    def _start_shard(self, shard: int) -> None:
        if self._open is not None:
            raise AssertionError(f"shard {self._open[0]} left incomplete")
        path = self.tmp / self._shard_names[shard]
        layout = [(n, *self._meta[n]) for n in self._shards[shard]]
        # Not truncated: on ranks, others write their tensors into the same file. Each rank
        # writing into a shard writes its header too (the same bytes, from the same layout).
        fd = self._guarded(lambda: os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
        mine = [n for n in self._shards[shard] if self._ranks.owns(n)]
        self._open = (shard, fd, {n: tensor_nbytes(*self._meta[n]) for n in mine})
        self._guarded(lambda: _write_all(fd, memoryview(header_bytes(layout)), 0))

    def _finish_shard(self) -> None:
        shard, fd, _ = self._open
        self._guarded(lambda: os.fsync(fd))
        os.close(fd)
        self._open = None
        if self._ranks.distributed:
            self.written_here += [n for n in self._shards[shard] if self._ranks.owns(n)]
            self._guarded(self._save_rank_progress)
            self._shares_done += 1
            if (
                os.environ.get(KILL_RANK_AFTER_SHARDS_ENV)
                == f"{self._ranks.rank}:{self._shares_done}"
            ):
                os.kill(os.getpid(), signal.SIGKILL)
            return
        self.complete.add(shard)
        self._files.append(self.tmp / self._shard_names[shard])
        self._guarded(self._save_progress)
        if os.environ.get(INTERRUPT_AFTER_SHARDS_ENV) == str(len(self.complete)):
            self._abandoned = True  # as a Ctrl-C now would: queued writes are skipped
            os.kill(os.getpid(), signal.SIGINT)

    def _guarded(self, action):
        try:
            return action()
        except OSError as error:
            raise R2MError(f"{self.out}: write failed ({error.strerror or error})") from None

    def finish_share(self) -> list[str]:
        """Waits until this rank's tensors are written and fsynced; returns their names."""
        self._drain()
        return self.written_here

    def note_shares(self, shares: list[list[str]]) -> None:
        """On rank 0 of a distributed merge: the tensors every rank wrote (finish_share),
        which complete the shards that hold them."""
        written = {name for i in self.complete for name in self._shards[i]}
        written.update(name for share in shares for name in share)
        self.complete.update(i for i, s in enumerate(self._shards) if written.issuperset(s))
        self._files = [self.tmp / self._shard_names[i] for i in sorted(self.complete)]
        for path in self.tmp.glob(RANK_PROGRESS_PATTERN):
            path.unlink()

    def add_file(self, name: str, text: str) -> None:
        self._drain()
        path = self.tmp / name
        self._guarded(lambda: path.write_text(text))
        self._files.append(path)

    def copy_file(self, source: Path) -> None:
        self._drain()
        path = self.tmp / source.name
        self._guarded(lambda: shutil.copyfile(source, path))
        self._files.append(path)

    def _commit(self) -> None:
        missing = [self._shard_names[i] for i in range(len(self._shards)) if i not in self.complete]
        if missing:
            raise AssertionError(f"shards never completed: {', '.join(missing[:3])}")
        if len(self._shards) > 1:
            total_size = sum(tensor_nbytes(*meta) for meta in self._meta.values())
            index = {
                "metadata": {"total_size": total_size},
                "weight_map": {n: self._shard_names[s] for n, s in self._shard_of.items()},
            }
            self.add_file(INDEX_FILE, json.dumps(index, indent=2) + "\n")
        self._progress_path().unlink()
        self._guarded(self._add_manifest)
        replaced = None
        try:
            for path in self._files:
                _fsync_path(path)
            _fsync_path(self.tmp)
            # Checked again now: the output may have changed while the merge ran.
            if check_output_target(self.out, self._overwrite):
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
            remove_replaced(replaced, self.out)

    def _add_manifest(self) -> None:
        names = [path.name for path in self._files]
        path = self.tmp / MANIFEST_FILE
        path.write_text(manifest_text(self.tmp, names))
        self._files.append(path)
