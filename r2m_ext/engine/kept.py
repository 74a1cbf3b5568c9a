"""What methods keep from one pass to a later one (R²M's truncation factors), in tiers: the memory
budget first, then a scratch file on disk; where no tier has room the values are not kept and the
method computes them again. A kept value reads back bit for bit whichever tier held it.

The scratch file is anonymous (O_TMPFILE where the filesystem has it, else unlinked as soon as it
is created): it has no name to leave behind, and goes when it is closed or the process ends, on
success, error, Ctrl-C or a kill alike."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


class KeptStore:
    """The memory tier's bytes are reserved in the budget by the caller (MergeInputs.keep), which
    knows what later steps need; this store holds the values and the scratch file."""

    def __init__(self, scratch_dir: Path | None):
        """`scratch_dir`: where the scratch file goes (None: no disk tier)."""
        self.scratch_dir = scratch_dir
        self._memory: dict[str, tuple[tuple[torch.Tensor, ...], int]] = {}
        # key: (offset in the scratch file, [(shape, dtype, device)] of the values)
        self._spilled: dict[
            str, tuple[int, list[tuple[torch.Size, torch.dtype, torch.device]]]
        ] = {}
        self._file = None
        self._end = 0
        self.scratch_bytes_written = 0
        self.scratch_bytes_read = 0
        self.disk_error: str | None = None  # why the disk tier stopped taking values

    def put(
        self, key: str, values: tuple[torch.Tensor, ...], nbytes: int, room_in_memory: bool
    ) -> str | None:
        """Keeps `values` (`nbytes` in all) in memory when `room_in_memory` (the caller has
        reserved them in the budget), else on disk if it can; returns the tier, or None."""
        if room_in_memory:
            self._memory[key] = (values, nbytes)
            return "memory"
        if self.scratch_dir is None or self.disk_error is not None:
            return None
        try:
            offset = self._append(values)
        except OSError as error:
            # A full disk (or any write error) ends the disk tier for this merge: what it did not
            # take is recomputed, with the same bits.
            self.disk_error = f"{self.scratch_dir}: {error.strerror or error}"
            return None
        self._spilled[key] = (offset, [(v.shape, v.dtype, v.device) for v in values])
        return "scratch"

    def take(self, key: str) -> tuple[tuple[torch.Tensor, ...], int] | None:
        """(values, bytes the budget held for them: 0 from disk), no longer kept; or None."""
        if key in self._memory:
            return self._memory.pop(key)
        if key not in self._spilled:
            return None
        offset, layout = self._spilled.pop(key)
        values = []
        for shape, dtype, device in layout:
            value = torch.empty(shape, dtype=dtype)
            buffer = value.view(-1).view(torch.uint8).numpy()
            _read_exactly(self._file.fileno(), memoryview(buffer), offset)
            offset += buffer.nbytes
            self.scratch_bytes_read += buffer.nbytes
            values.append(value.to(device))
        return tuple(values), 0

    def memory_bytes(self) -> int:
        return sum(nbytes for _, nbytes in self._memory.values())

    def close(self) -> None:
        """Forgets every kept value (the caller releases `memory_bytes()` first) and closes the
        scratch file, which takes it off the disk."""
        self._memory.clear()
        self._spilled.clear()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _append(self, values: tuple[torch.Tensor, ...]) -> int:
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.scratch_dir, prefix=".r2m-scratch-")
        offset = self._end
        for value in values:
            data = value.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()
            _write_exactly(self._file.fileno(), memoryview(data), self._end)
            self._end += data.nbytes
            self.scratch_bytes_written += data.nbytes
        return offset


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
