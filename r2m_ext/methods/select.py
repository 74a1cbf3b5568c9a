"""Exact k-th largest magnitude per task over a whole model, streamed in bounded memory (the
global TIES threshold).

Non-negative floats order like their bit patterns read as integers, so selection is a radix
select on the bits: a pass histograms the next 16 bits of the entries that still match the known
prefix, which pins 16 more bits of the answer; once few enough entries match, a pass collects them
and the answer is read off a sort. Float32 needs at most 2 passes, float64 at most 4."""

from __future__ import annotations

import torch

_DIGIT_BITS = 16
# Entries per task a collecting pass may hold (x 8 bytes).
COLLECT_LIMIT = 1 << 20


# The smallest bit pattern of a non-finite float32 magnitude (Inf; NaN above it).
_FLOAT32_INF_BITS = 0x7F800000


# One pass's observations, per task: int64 digit counts [2^width], a list of collected bit
# patterns (a task finishing by sort), or None (a task already done). Combined with `+`.
SelectPartial = list


def combine_partials(total: SelectPartial | None, more: SelectPartial) -> SelectPartial:
    """Two passes' worth of observations as one (counts add, collections concatenate): exact and
    order-free, so partials may be combined in any grouping."""
    if total is None:
        return more
    if more is None:  # a share with no tensors (a rank that observed none)
        return total
    return [None if a is None else a + b for a, b in zip(total, more, strict=True)]


class KthLargestMagnitude:
    """Each pass over the whole model: `observe` each block's magnitudes (or, from a native
    kernel, `counts_partial` of histograms of the digits `histogram_digit` names), combine what
    they return with `combine_partials`, and hand the total to `finish_pass`; until `done`."""

    def __init__(self, ks: list[int], dtype: torch.dtype, collect_limit: int = COLLECT_LIMIT):
        """`collect_limit`: entries per task a pass may collect to finish by sorting (-1: never,
        every pass a histogram)."""
        self._collect_limit = collect_limit
        self._ks = list(ks)  # rank still sought within the entries matching the prefix
        self._int_dtype = torch.int32 if dtype == torch.float32 else torch.int64
        self._dtype = dtype
        bits = 32 if dtype == torch.float32 else 64
        self._free_bits = [bits - 1] * len(ks)  # low bits not yet known (the sign bit is 0)
        self._prefix = [0] * len(ks)
        self._matching = [None] * len(ks)  # entries matching the prefix, when known
        self._collecting = [False] * len(ks)
        self._start_pass()

    def _start_pass(self) -> None:
        for i, count in enumerate(self._matching):
            self._collecting[i] = count is not None and count <= self._collect_limit

    @property
    def done(self) -> bool:
        return all(bits == 0 for bits in self._free_bits)

    def observe(self, magnitudes: torch.Tensor) -> SelectPartial:
        """What magnitudes [N, ...] (|tau| in the compute dtype) of one block add to this pass."""
        bits = magnitudes.reshape(len(self._ks), -1).view(self._int_dtype).long()
        partial: SelectPartial = []
        for i in range(len(self._ks)):
            if self._free_bits[i] == 0:
                partial.append(None)
                continue
            row = bits[i]
            matches = row[(row >> self._free_bits[i]) == self._prefix[i]]
            if self._collecting[i]:
                partial.append([matches])
                continue
            width = min(_DIGIT_BITS, self._free_bits[i])
            digits = (matches >> (self._free_bits[i] - width)) & ((1 << width) - 1)
            partial.append(torch.bincount(digits, minlength=1 << width))
        return partial

    def histogram_digit(self) -> tuple[torch.Tensor, int, int]:
        """(prefixes int64 [N], shift, width) of the next histogram pass, for
        ops.magnitude_histogram; float32 magnitudes, no task collecting."""
        assert self._dtype == torch.float32 and not any(self._collecting), "histogram passes only"
        (free_bits,) = set(self._free_bits)  # every task pins the same bits each pass
        width = min(_DIGIT_BITS, free_bits)
        return torch.tensor(self._prefix, dtype=torch.int64), free_bits - width, width

    @staticmethod
    def counts_partial(counts: torch.Tensor) -> SelectPartial:
        """Counts [N, 2^width] of the digits `histogram_digit` names, as a partial."""
        return list(counts)

    def finish_pass(self, total: SelectPartial) -> None:
        """Pins the next digit of every task from a whole pass's combined observations."""
        for i in range(len(self._ks)):
            if self._free_bits[i] == 0:
                continue
            if self._collecting[i]:
                values = torch.cat(total[i]).sort(descending=True).values
                self._prefix[i] = int(values[self._ks[i] - 1])
                self._free_bits[i] = 0
                continue
            width = min(_DIGIT_BITS, self._free_bits[i])
            counts = total[i].flip(0)  # highest digit first
            above = torch.cumsum(counts, 0)
            position = int(torch.searchsorted(above, self._ks[i]))
            digit = (1 << width) - 1 - position
            self._ks[i] -= int(above[position - 1]) if position > 0 else 0
            self._matching[i] = int(counts[position])
            self._prefix[i] = (self._prefix[i] << width) | digit
            self._free_bits[i] -= width
        self._start_pass()

    def needed_at_value(self) -> list[int]:
        """Once `done`: per task, how many of the entries equal to `values()` are among its k
        largest (the others of the k are strictly larger). Histogram passes only."""
        assert self.done and not any(self._collecting), "after histogram passes"
        return list(self._ks)

    def at_value(self) -> list[int]:
        """Once `done`: per task, how many entries equal `values()` in all (needed_at_value of
        them are among its k largest). Histogram passes only."""
        assert self.done and not any(self._collecting), "after histogram passes"
        return list(self._matching)

    def values(self) -> torch.Tensor:
        bits = torch.tensor(self._prefix, dtype=torch.int64).to(self._int_dtype)
        return bits.view(self._dtype)


def counts_nonfinite(counts: torch.Tensor, shift: int, width: int) -> bool:
    """Whether histogram counts of a pass over every entry (shift + width = 31, no prefix) hold a
    non-finite magnitude: Inf and NaN have the largest float32 bit patterns."""
    assert shift + width == 31, "only a first pass sees every entry"
    return bool(counts[:, _FLOAT32_INF_BITS >> shift :].any())
