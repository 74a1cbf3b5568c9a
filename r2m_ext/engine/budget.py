"""The memory budget (`--max-memory`): every buffer the engine holds is counted against it before
it is allocated: input tensors (raw and in the compute dtype), method workspace, cached factors,
prefetched tensors and output blocks. On `--device cuda` it bounds GPU memory, where all of those
live; the host then holds only tensors read ahead and one step's raw inputs."""

from __future__ import annotations

import ctypes
import resource
import threading

import torch

from r2m_ext._backend import native_module
from r2m_ext.errors import R2MError
from r2m_ext.io.writer import parse_size

# Without --max-memory: this fraction of the memory the kernel reports as available.
DEFAULT_FRACTION_OF_AVAILABLE = 0.5


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise R2MError("cannot read available memory from /proc/meminfo; pass --max-memory")


def default_budget(device: torch.device | None = None) -> int:
    """Half the available host memory, or on a CUDA device half its free memory."""
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * DEFAULT_FRACTION_OF_AVAILABLE)
    return int(available_memory() * DEFAULT_FRACTION_OF_AVAILABLE)


# Without --host-memory on a GPU: the share of available host memory the host tier of kept
# values (R²M's truncation factors beyond the GPU budget) may pin.
DEFAULT_HOST_TIER_FRACTION = 0.25


def host_tier_bytes(given: str | int | None, device: torch.device, sharing: int = 1) -> int:
    """Bytes of host memory kept values may use beyond --max-memory (`--host-memory`). Unless
    told: on a GPU a quarter of the available host memory (shared by the ranks of a machine); on
    the CPU none, since --max-memory already bounds host memory there."""
    if given is not None:
        return parse_size(given, allow_zero=True)  # 0 (in any unit): no host tier
    if device.type != "cuda":
        return 0
    return int(available_memory() * DEFAULT_HOST_TIER_FRACTION) // sharing


def format_bytes(count: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


# glibc serves allocations below its mmap threshold from heap arenas and raises that threshold
# to 32 MB after frees; freed tensors then stay in fragmented arenas (one per reader thread) and
# resident memory grows far past what the engine holds (1.79 GB for a 1 GB budget, measured).
# A fixed threshold returns every large buffer to the OS when it is freed (1.07 GB, measured).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_frees_to_os() -> None:
    """Makes glibc map every allocation of 1 MB or more on its own, so freeing it unmaps it.
    Process-wide, so only the engine's entry points call it; a no-op off glibc. The native ops
    are told, as their large outputs are then fresh memory and worth huge pages
    (python/ops/host_memory.h)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        if not libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
            return
    except (OSError, AttributeError):
        return
    native = native_module()
    if native is not None:
        native.set_large_allocations_fresh(True)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemoryBudget:
    """Bytes reserved by long-lived holders (caches, prefetch) and the peak of reservations plus
    the largest step. Thread-safe: the prefetcher reserves from its own threads."""

    def __init__(self, limit: int | str | None, device: torch.device | None = None):
        self.limit = default_budget(device) if limit is None else parse_size(limit)
        self._reserved = 0
        self.peak = 0
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        return self.limit - self._reserved

    def try_reserve(self, count: int) -> bool:
        with self._lock:
            if self._reserved + count > self.limit:
                return False
            self._reserved += count
            self.peak = max(self.peak, self._reserved)
            return True

    def release(self, count: int) -> None:
        with self._lock:
            self._reserved -= count

    def note_step(self, count: int) -> None:
        """Records a transient step of `count` bytes on top of what is reserved."""
        with self._lock:
            self.peak = max(self.peak, self._reserved + count)
