"""What methods keep from one pass to a later one (R²M's truncation factors), in tiers: the memory
budget first, then host memory within `--host-memory` (on a GPU: page-locked, so the copy back
overlaps), then a scratch file on disk; where no tier has room the values are not kept and the
method computes them again. A kept value reads back bit for bit whichever tier held it.

Values bound for the scratch file are written by a background thread while the pass computes on
(their bytes bounded: `write_behind`), at offsets fixed when they are kept, so the file's layout
does not depend on timing. A write that fails (a full disk) ends the disk tier: the value it was
writing, and every one kept after, is computed again. Where each value ended up is settled once
the pass that kept it has ended (`settle`).

The scratch file is anonymous (O_TMPFILE where the filesystem has it, else unlinked as soon as it
is created): it has no name to leave behind, and goes when it is closed or the process ends, on
success, error, Ctrl-C or a kill alike."""

from __future__ import annotations

import os
import tempfile
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

# Tiers, in the order they are tried; "recomputed" is what the report says of a value none held.
MEMORY, HOST, SCRATCH = "memory", "host", "scratch"

# (shape, dtype) of each value of a key in the scratch file.
Layout = list[tuple[torch.Size, torch.dtype]]


def host_bytes(nbytes: int, pinned: bool) -> int:
    """What `nbytes` of host memory cost: torch's page-locked allocator hands out blocks of a
    power of two bytes, and counting those keeps `--host-memory` a bound on what it really pins."""
    return 1 << max(0, nbytes - 1).bit_length() if pinned else nbytes


class KeptStore:
    """The memory tier's bytes are reserved in the budget by the caller (MergeInputs.keep), which
    knows what later steps need; this store holds the values, the host tier (`host_limit` bytes,
    page-locked where `pin`) and the scratch file. Thread-safe: values are taken back by the
    background reader too."""

    def __init__(
        self,
        scratch_dir: Path | None,
        host_limit: int = 0,
        pin: bool = False,
        write_behind: int = 0,
    ):
        """`scratch_dir`: where the scratch file goes (None: no disk tier); `write_behind`: bytes
        of values on their way to it that a background thread may hold (0: written at once)."""
        self.scratch_dir = scratch_dir
        self.host_limit = host_limit
        self._pin = pin
        self._lock = threading.Lock()
        self._memory: dict[str, tuple[tuple[torch.Tensor, ...], int]] = {}
        self._host: dict[str, tuple[tuple[torch.Tensor, ...], int]] = {}  # (values, cost)
        self.host_held = 0
        self.host_peak = 0
        self._spilled: dict[str, tuple[int, Layout]] = {}  # key: (offset in the file, layout)
        self._file = None
        self._end = 0
        self.scratch_bytes_written = 0
        self.scratch_bytes_read = 0
        self.disk_error: str | None = None  # why the disk tier stopped taking values
        self._write_behind = write_behind
        self._writer = None
        self._pending: deque[tuple[Future, int]] = deque()
        self._pending_bytes = 0

    def put(
        self, key: str, values: tuple[torch.Tensor, ...], nbytes: int, room_in_memory: bool
    ) -> None:
        """Keeps `values` (`nbytes` in all) in memory when `room_in_memory` (the caller has
        reserved them in the budget), else in host memory if it has room, else on disk if it
        can. The caller does not change `values` afterwards."""
        if room_in_memory:
            with self._lock:
                self._memory[key] = (values, nbytes)
            return
        cost = sum(host_bytes(v.numel() * v.element_size(), self._pin) for v in values)
        if self.host_held + cost <= self.host_limit:
            held = tuple(self._to_host(v) for v in values)
            with self._lock:
                self._host[key] = (held, cost)
                self.host_held += cost
                self.host_peak = max(self.host_peak, self.host_held)
            return
        if self.scratch_dir is None or self.disk_error is not None:
            return
        data = [v.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy() for v in values]
        if self._file is None:
            try:
                self._file = tempfile.TemporaryFile(dir=self.scratch_dir, prefix=".r2m-scratch-")
            except OSError as error:
                self._end_disk_tier(error)
                return
        offset = self._end
        self._end += nbytes
        with self._lock:
            self._spilled[key] = (offset, [(v.shape, v.dtype) for v in values])
        if nbytes > self._write_behind:
            self.flush()  # in file order, so that a failure ends the tier at one place
            self._write(key, data, offset)
            return
        while self._pending_bytes + nbytes > self._write_behind:
            self._wait_oldest()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="r2m-scratch")
        self._pending.append((self._writer.submit(self._write, key, data, offset), nbytes))
        self._pending_bytes += nbytes

    def flush(self) -> None:
        """Waits for every value on its way to the scratch file: where each is, is then settled."""
        while self._pending:
            self._wait_oldest()

    def where(self, key: str) -> str | None:
        """The tier holding `key` (settled once `flush` has run), or None."""
        with self._lock:
            for tier, held in (
                (MEMORY, self._memory),
                (HOST, self._host),
                (SCRATCH, self._spilled),
            ):
                if key in held:
                    return tier
        return None

    def take(self, key: str) -> tuple[tuple[torch.Tensor, ...], int] | None:
        """(values, bytes the budget held for them: 0 from host memory or disk), no longer kept;
        or None. Values from host memory or disk are on the host (page-locked where `pin`), for
        the caller to move where they were."""
        with self._lock:
            if key in self._memory:
                return self._memory.pop(key)
            host = self._host.pop(key, None)
            if host is not None:
                self.host_held -= host[1]
                return host[0], 0
            spilled = self._spilled.pop(key, None)
        if spilled is None:
            return None
        offset, layout = spilled
        values = []
        for shape, dtype in layout:
            value = torch.empty(shape, dtype=dtype, pin_memory=self._pin)
            buffer = value.view(-1).view(torch.uint8).numpy()
            _read_exactly(self._file.fileno(), memoryview(buffer), offset)
            offset += buffer.nbytes
            with self._lock:
                self.scratch_bytes_read += buffer.nbytes
            values.append(value)
        return tuple(values), 0

    def is_held_off_device(self, key: str) -> bool:
        """Whether taking `key` reads or copies it (host memory on a GPU, or disk): worth doing
        ahead of time."""
        with self._lock:
            return key in self._spilled or (self._pin and key in self._host)

    def nbytes_of(self, key: str) -> int:
        """Bytes of `key`'s values, held in host memory or on disk."""
        with self._lock:
            if key in self._host:
                return sum(v.numel() * v.element_size() for v in self._host[key][0])
            return sum(shape.numel() * dtype.itemsize for shape, dtype in self._spilled[key][1])

    def memory_bytes(self) -> int:
        with self._lock:
            return sum(nbytes for _, nbytes in self._memory.values())

    def close(self) -> None:
        """Forgets every kept value (the caller releases `memory_bytes()` first), lets a write
        under way finish and closes the scratch file, which takes it off the disk."""
        for future, _ in self._pending:
            future.cancel()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        self._pending.clear()
        self._pending_bytes = 0
        with self._lock:
            self._memory.clear()
            self._host.clear()
            self.host_held = 0
            self._spilled.clear()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _to_host(self, value: torch.Tensor) -> torch.Tensor:
        if value.device.type == "cpu" and not self._pin:
            return value  # already host memory; the budget no longer counts it
        held = torch.empty(value.shape, dtype=value.dtype, pin_memory=self._pin)
        return held.copy_(value)

    def _wait_oldest(self) -> None:
        future, nbytes = self._pending.popleft()
        self._pending_bytes -= nbytes
        future.result()

    def _write(self, key: str, data: list, offset: int) -> None:
        if self.disk_error is not None:
            # An earlier write failed: this value is computed again, like every later one.
            with self._lock:
                self._spilled.pop(key, None)
            return
        try:
            for array in data:
                _write_exactly(self._file.fileno(), memoryview(array), offset)
                offset += array.nbytes
                with self._lock:
                    self.scratch_bytes_written += array.nbytes
        except OSError as error:
            with self._lock:
                self._spilled.pop(key, None)
            self._end_disk_tier(error)

    def _end_disk_tier(self, error: OSError) -> None:
        # A full disk (or any write error) ends the disk tier for this merge: what it did not
        # take is recomputed, with the same bits.
        self.disk_error = f"{self.scratch_dir}: {error.strerror or error}"


def _write_exactly(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _read_exactly(fd: int, buffer: memoryview, offset: int) -> None:
    while len(buffer):
        read = os.preadv(fd, [buffer], offset)
        if read == 0:
            raise AssertionError("the scratch file ended before a value it holds")
        buffer, offset = buffer[read:], offset + read
