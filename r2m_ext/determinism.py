"""The rules that make merges reproducible (spec §7): every random draw is a pure function of the
seed, a tensor's name and shape, and the index of what is drawn, never of the order, block split,
budget, device or process that draws it. The C++ and CUDA kernels (csrc/sketch/gaussian.h,
csrc/merge/dare_mask.h) follow the same rules; reference.py holds the pure-torch twins of the
draws themselves."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (Steele, Lea and Flood 2014)


def name_key(name: str, shape: Sequence[int]) -> int:
    """A 63-bit key from a tensor's name and shape, stable across runs, processes and platforms
    (unlike Python's salted hash())."""
    text = f"{name}\0{tuple(int(s) for s in shape)}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def splitmix64(stream: int, index: int) -> int:
    """Entry `index` of the SplitMix64 sequence of `stream`, as a 64-bit integer."""
    z = (stream + (index + 1) * GOLDEN_GAMMA) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def sketch_stream(seed: int, key: int) -> int:
    """The random stream of one sketch or mask: the seed mixed into the key (as
    csrc/sketch/gaussian.h does)."""
    return splitmix64(key, seed)


def signed64(value: int) -> int:
    """The int64 with the low 64 bits of `value`: how a uint64 (a seed) crosses torch's int."""
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def dare_stream(seed: int, name: str, shape: Sequence[int], task: int) -> int:
    """The SplitMix64 stream of task `task`'s DARE mask on a tensor."""
    return sketch_stream(seed, name_key(f"dare/{task}/{name}", shape))


@dataclass(frozen=True)
class DareMask:
    """DARE's mask on a block of a tensor: entry `index` of task i is kept where the SplitMix64
    uniform of (streams[i], index) >= drop_rate, then rescaled by 1 / (1 - drop_rate); the block
    starts at the tensor's element `first_index`."""

    streams: tuple[int, ...]  # 64-bit, one per expert
    first_index: int
    drop_rate: float
