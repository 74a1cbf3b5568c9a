"""The safetensors format, read and written directly: an 8-byte little-endian header length, a JSON
header (name -> dtype, shape, data_offsets), then the tensor bytes.

A tensor (or a row block of one) is read by mapping just its bytes, copy-on-write, with a
read-ahead hint, so they are never copied out of the page cache: on a 2-core machine that copy
cost as much as the merge's arithmetic. The mapping goes away with the last tensor viewing it,
so resident memory holds the live tensors only and a memory budget keeps its meaning over inputs
larger than RAM (a whole-file mapping, as the safetensors library makes, would keep every touched
page resident). Positioned reads into owned buffers remain for page-locked reads (a GPU copy) and
for data whose offset does not suit its dtype's alignment."""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from r2m_ext.errors import R2MError
from r2m_ext.io.buffers import HostBuffers

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
# The reference implementation refuses larger headers; so do we, before allocating one.
MAX_HEADER_BYTES = 100_000_000
# Linux transfers at most 0x7ffff000 bytes per read call.
_MAX_READ = 1 << 30
# madvise(MADV_POPULATE_READ), Linux 5.14+; Python 3.11's mmap module does not name it.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)


class _Malformed(Exception):
    """A header the reference reader (the safetensors library) would reject; the message uses
    its wording where it has one."""


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _Malformed(f"invalid JSON in header: {key!r} is listed twice")
        seen[key] = value
    return seen


def _parse_header(raw: bytes) -> dict:
    """The header as a dict, checked as strictly as the reference reader checks it: UTF-8 (not
    any encoding JSON allows), an object, no name twice, `__metadata__` a string-to-string map."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _Malformed(f"invalid UTF-8 in header: {error.reason} at byte {error.start}") from None
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates)
    except ValueError as error:
        raise _Malformed(f"invalid JSON in header: {error}") from None
    except RecursionError:
        raise _Malformed("invalid JSON in header: nested too deeply") from None
    if not isinstance(header, dict):
        raise _Malformed("invalid JSON in header: not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Malformed("invalid JSON in header: __metadata__ must map strings to strings")
    return header


def _is_count(value: object) -> bool:
    """A JSON number the reference reads as usize: an integer >= 0 (not 2.0, "2" or true)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_entry(name: str, info: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise _Malformed(
            f"invalid JSON in header: tensor {name!r} needs dtype, shape and data_offsets"
        )
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in DTYPES:
        raise _Malformed(f"tensor {name!r} has dtype {code!r}, not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise _Malformed(
            f"invalid JSON in header: tensor {name!r} shape {shape!r} is not a list of "
            "integers >= 0"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise _Malformed(
            f"invalid JSON in header: tensor {name!r} data_offsets {offsets!r} are not two "
            "integers >= 0"
        )
    dtype = DTYPES[code]
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise _Malformed(
            f"tensor {name!r}: shape {list(shape)} of {code} needs "
            f"{math.prod(shape) * dtype.itemsize} bytes but its offsets span {end - begin}"
        )
    return dtype, tuple(shape), begin, end


class SafetensorsFile:
    """One .safetensors file: header validated at open, tensors read on demand."""

    def __init__(self, path: Path, buffers: HostBuffers | None = None):
        self.path = Path(path)
        self._buffers = buffers
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as error:
            raise R2MError(f"{self.path}: cannot open ({error.strerror or error})") from None
        try:
            self.entries = self._read_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _fail(self, reason: str) -> R2MError:
        return R2MError(f"{self.path}: not a readable safetensors file ({reason})")

    def _read_header(self) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise self._fail(f"{size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if header_len > MAX_HEADER_BYTES:
            raise self._fail(
                f"header too large: its length {header_len} is over the limit of "
                f"{MAX_HEADER_BYTES} bytes"
            )
        if 8 + header_len > size:
            raise self._fail(
                f"header length {header_len} does not fit a file of {size} bytes (truncated?)"
            )
        try:
            header = _parse_header(os.pread(self._fd, header_len, 8))
            entries = {
                name: _tensor_entry(name, info)
                for name, info in header.items()
                if name != "__metadata__"
            }
        except _Malformed as error:
            raise self._fail(str(error)) from None
        self.data_start = 8 + header_len
        data_size = size - self.data_start
        position = 0
        for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
            if begin != position:
                raise self._fail(f"tensor {name!r} starts at byte {begin}, expected {position}")
            position = end
        if position != data_size:
            raise self._fail(
                f"header describes {position} bytes of data but the file holds {data_size}"
                + (
                    " (truncated?)"
                    if position > data_size
                    else ": incomplete metadata, file not fully covered"
                )
            )
        return entries

    def read(self, name: str, rows: slice | None = None, pinned: bool = False) -> torch.Tensor:
        """Tensor `name`, or rows [start, stop) of its first dimension: mapped from the file, or
        when `pinned` read into a page-locked buffer of its own (so that a copy to a GPU can run
        asynchronously). Writable either way; writes never reach the file."""
        dtype, shape, begin, end = self.entries[name]
        if rows is not None:
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            begin, end = begin + rows.start * row_bytes, begin + rows.stop * row_bytes
            shape = (rows.stop - rows.start, *shape[1:])
        if end == begin:  # nothing to read (and a 0-byte buffer may not be viewable as dtype)
            return torch.empty(shape, dtype=dtype, pin_memory=pinned)
        offset = self.data_start + begin
        if not pinned and offset % dtype.itemsize == 0:
            data = self._map(name, offset, end - begin)
        else:
            data = self._read_into_buffer(name, offset, end - begin, pinned)
        return data.view(dtype).reshape(shape)

    def _map(self, name: str, offset: int, nbytes: int) -> torch.Tensor:
        """Bytes [offset, offset + nbytes) of the file as a uint8 tensor over a private mapping
        of their pages, unmapped when the last tensor viewing it is freed."""
        # A file cut short after its header was checked would make touching the lost pages a
        # fatal SIGBUS instead of an error; this check leaves only a race with another writer.
        if os.fstat(self._fd).st_size < offset + nbytes:
            raise R2MError(f"{self.path}: file shrank while reading tensor {name!r}")
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(
                self._fd,
                offset - start + nbytes,
                # Private: the merge may work in place on what it read. Not MAP_POPULATE, which
                # on a private writable mapping copies every page up front (measured on an
                # average of 8 ViT-B/16: 880k page faults instead of 133k, and slower).
                flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=start,
            )
        except OSError as error:
            raise R2MError(
                f"{self.path}: cannot map tensor {name!r} ({error.strerror or error})"
            ) from None
        # Asks the kernel to read pages not yet cached ahead, while earlier tensors compute.
        mapped.madvise(mmap.MADV_WILLNEED)
        if _MADV_POPULATE_READ is not None:
            # Maps the (cached) pages now, in the reader thread, without copying them, instead
            # of page faults inside the arithmetic (ViT-B/16 x 8 average: 1.47 to 1.34 s).
            try:
                mapped.madvise(_MADV_POPULATE_READ)
            except OSError:  # Linux before 5.14: the pages fault in on first use instead
                pass
        # The array holds the mapping (its base); torch.from_numpy holds the array.
        return torch.from_numpy(np.frombuffer(mapped, np.uint8, nbytes, offset - start))

    def _read_into_buffer(self, name: str, offset: int, nbytes: int, pinned: bool) -> torch.Tensor:
        if pinned or self._buffers is None:
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        else:
            buffer = self._buffers.take(nbytes)
        view = memoryview(buffer.numpy())
        done = 0
        while done < len(view):
            chunk = view[done : done + _MAX_READ]
            try:
                got = os.preadv(self._fd, [chunk], offset + done)
            except OSError as error:
                raise R2MError(
                    f"{self.path}: cannot read tensor {name!r} ({error.strerror or error})"
                ) from None
            if got == 0:
                raise R2MError(f"{self.path}: file ended inside tensor {name!r} (truncated?)")
            done += got
        return buffer

    def close(self) -> None:
        os.close(self._fd)


def header_bytes(layout: Sequence[tuple[str, Sequence[int], torch.dtype]]) -> bytes:
    """Length prefix and JSON header for tensors stored contiguously in `layout` order, padded with
    spaces to a multiple of 8 bytes so every tensor's data stays aligned."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in layout:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": DTYPE_CODES[dtype],
            "shape": [int(s) for s in shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, for any dtype numpy lacks (bfloat16, float8)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())
