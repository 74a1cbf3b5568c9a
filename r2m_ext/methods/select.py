"""Exact k-th largest magnitude per task over a whole model, streamed in bounded memory (the
global TIES threshold).

Non-negative floats order like their bit patterns read as integers, so selection is a radix
select on the bits: a pass histograms the next 16 bits of the entries that still match the known
prefix, which pins 16 more bits of the answer; once few enough entries match, a pass collects them
and the answer is read off a sort. Float32 needs at most 2 passes, float64 at most 4.

With native kernels, a float32 select usually needs one pass over everything: a sample of the
entries (a few row chunks of every tensor: SAMPLE_FRACTION of them) gives a window of first
digits that very likely holds the answer's, and the first pass, besides counting, collects the
entries whose digit lies in that window. Where the pass's counts then pin a digit inside the
window, its collected entries give the answer's remaining bits; elsewhere (a poor sample, or a
window overflowing its collect limit) a second pass runs as before. The answer is exact either
way: the sample only decides how much work finding it takes."""

from __future__ import annotations

import math

import numpy as np
import torch

_DIGIT_BITS = 16
# Entries per task a collecting pass may hold (x 8 bytes).
COLLECT_LIMIT = 1 << 20


# The share of entries a sample reads (in SAMPLE_CHUNKS row chunks spread over each tensor).
SAMPLE_FRACTION = 1 / 64
SAMPLE_CHUNKS = 8
# Tensors of at most this many elements are sampled whole.
SAMPLE_WHOLE = 1 << 16
# A window spans at least this share of the entries around the sample's estimate of the
# answer's rank, on each side, and at least WINDOW_SIGMAS standard errors of that estimate (as if
# the sample were drawn at random): row chunks are not a random draw, and a window that misses
# costs a second pass.
WINDOW_SHARE = 0.005
WINDOW_SIGMAS = 4.0
# Entries a window may collect per task (int32 bit patterns: 16 MB), over a whole pass, at most:
# a select is given its own limit within the memory budget. A window is planned to collect at
# most WINDOW_PLANNED of its limit (the rest is room for the sample's error); where one digit
# alone holds more (a large model's digit at the answer, DARE's zeros), no window is planned and
# the select takes its second pass.
WINDOW_COLLECT_LIMIT = 1 << 22
WINDOW_PLANNED = 0.75

# The smallest bit pattern of a non-finite float32 magnitude (Inf; NaN above it).
_FLOAT32_INF_BITS = 0x7F800000


# One pass's observations, per task: int64 digit counts [2^width], a list of collected bit
# patterns (a task finishing by sort), or None (a task already done), combined with `+`; or, from
# native kernels, Histograms of every task.
SelectPartial = list


class Histograms:
    """A native histogram pass's observations of every task: int64 counts [N, 2^width] that
    ops.magnitude_histogram_into counts into in place, and in a pass with a window the bit
    patterns collected per task (int32 tensors; a task's become None once more than `limit`
    were collected: its window then resolves nothing). Added like counts: exact and order-free
    (a collection is a multiset)."""

    def __init__(self, counts: torch.Tensor, windowed: bool, limit: int = 0):
        self.counts = counts
        n = counts.shape[0]
        self.collected: list[list[torch.Tensor] | None] | None = (
            [[] for _ in range(n)] if windowed else None
        )
        self._sizes = [0] * n
        self._limit = limit

    def collect(self, patterns: list[torch.Tensor] | None) -> None:
        """Adds a block's collected bit patterns per task (None: a pass with no window)."""
        if patterns is None or self.collected is None:
            return
        for i, more in enumerate(patterns):
            if self.collected[i] is None:
                continue
            self._sizes[i] += more.numel()
            if self._sizes[i] > self._limit:
                self.collected[i] = None
            else:
                self.collected[i].append(more)

    def __add__(self, other: Histograms) -> Histograms:
        total = Histograms(self.counts + other.counts, self.collected is not None, self._limit)
        if self.collected is not None:
            pairs = zip(self.collected, other.collected, strict=True)
            for i, (mine, theirs) in enumerate(pairs):
                total._sizes[i] = self._sizes[i] + other._sizes[i]
                fits = mine is not None and theirs is not None and total._sizes[i] <= self._limit
                total.collected[i] = mine + theirs if fits else None
        return total


def sample_rows(entry) -> list[slice | None]:
    """The row chunks of a tensor (a TensorPlan) that a select's sample reads: SAMPLE_CHUNKS
    chunks spread evenly over its rows, SAMPLE_FRACTION of them in all; the whole tensor (None)
    when it is small or has too few rows."""
    rows = entry.rows
    if entry.numel <= SAMPLE_WHOLE or rows < SAMPLE_CHUNKS:
        return [None]
    per_chunk = max(1, math.ceil(rows * SAMPLE_FRACTION / SAMPLE_CHUNKS))
    starts = [j * rows // SAMPLE_CHUNKS for j in range(SAMPLE_CHUNKS)]
    return [slice(start, min(rows, start + per_chunk)) for start in starts]


def combine_partials(total: SelectPartial | None, more: SelectPartial) -> SelectPartial:
    """Two passes' worth of observations as one (counts add, collections concatenate): exact and
    order-free, so partials may be combined in any grouping."""
    if total is None:
        return more
    if more is None:  # a share with no tensors (a rank that observed none)
        return total
    if isinstance(total, Histograms):
        return total + more
    return [None if a is None else a + b for a, b in zip(total, more, strict=True)]


class KthLargestMagnitude:
    """Each pass over the whole model: `observe` each block's magnitudes (or, from a native
    kernel, `counts_partial` of histograms of the digits `histogram_digit` names), combine what
    they return with `combine_partials`, and hand the total to `finish_pass`; until `done`."""

    def __init__(
        self,
        ks: list[int],
        dtype: torch.dtype,
        collect_limit: int = COLLECT_LIMIT,
        window_limit: int | None = None,
    ):
        """`collect_limit`: entries per task a pass may collect to finish by sorting (-1: never,
        every pass a histogram); `window_limit`: entries per task a window may collect (None:
        WINDOW_COLLECT_LIMIT)."""
        self._collect_limit = collect_limit
        self._given_window_limit = window_limit
        self._ks = list(ks)  # rank still sought within the entries matching the prefix
        self._int_dtype = torch.int32 if dtype == torch.float32 else torch.int64
        self._dtype = dtype
        bits = 32 if dtype == torch.float32 else 64
        self._free_bits = [bits - 1] * len(ks)  # low bits not yet known (the sign bit is 0)
        self._prefix = [0] * len(ks)
        self._matching = [None] * len(ks)  # entries matching the prefix, when known
        self._collecting = [False] * len(ks)
        self._window: tuple[torch.Tensor, torch.Tensor] | None = None  # per task digits [low, high]
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
        # Every task still selecting pins the same bits each pass; a task its window finished
        # gets a prefix no entry has (above any bit pattern), so the kernel counts nothing for it.
        (free_bits,) = {bits for bits in self._free_bits if bits > 0}
        width = min(_DIGIT_BITS, free_bits)
        prefixes = [
            p if bits > 0 else -1 for p, bits in zip(self._prefix, self._free_bits, strict=True)
        ]
        return torch.tensor(prefixes, dtype=torch.int64), free_bits - width, width

    @property
    def _window_limit(self) -> int:
        given = self._given_window_limit
        return WINDOW_COLLECT_LIMIT if given is None else min(given, WINDOW_COLLECT_LIMIT)

    def plan_window(self, sample: torch.Tensor, sampled: int, total: int) -> None:
        """Before the first histogram pass: from counts [N, 2^16] of its digit over a sample of
        `sampled` of the `total` entries per task, the window of digits the pass collects per
        task (`histogram_window`), sized to its window limit."""
        assert self._dtype == torch.float32 and self._free_bits == [31] * len(self._ks)
        width = _DIGIT_BITS
        lows, highs = [], []
        # NumPy for this bookkeeping over 2^16 bins per task: a few small operations per task,
        # each a tenth of torch's overhead on two busy cores.
        counts_all = sample.numpy()
        at_or_above = counts_all[:, ::-1].cumsum(1)  # per task, sample entries at or above a digit
        for i, counts in enumerate(counts_all):
            above = at_or_above[i]
            estimate = self._ks[i] * sampled / total  # the answer's rank within the sample
            q = min(1.0, self._ks[i] / total)
            spread = max(WINDOW_SHARE * sampled, WINDOW_SIGMAS * math.sqrt(q * (1 - q) * sampled))
            while True:
                top = max(1, math.floor(estimate - spread))
                bottom = max(top, min(sampled, math.ceil(estimate + spread)))
                high_position = int(np.searchsorted(above, top))
                low_position = int(np.searchsorted(above, bottom))
                inside = int(above[low_position]) - (
                    int(above[high_position - 1]) if high_position > 0 else 0
                )
                if low_position == (1 << width) - 1:  # digit 0: taken for exact zeros, which
                    inside -= int(counts[0])  # are counted, not collected
                fits = inside * total / sampled <= self._window_limit * WINDOW_PLANNED
                if fits or spread < 1:
                    break
                spread /= 2
            # A window reaching past the sample's largest (smallest) entries reaches every digit
            # above (below) them: the whole data's may lie beyond the sample's.
            if estimate - spread < 1:
                high_position = 0
            if estimate + spread > sampled:
                low_position = (1 << width) - 1
            if not fits:  # one digit holds too many entries (exact zeros after DARE's mask)
                low_position = high_position = -1  # an empty window: digit 2^16
            lows.append((1 << width) - 1 - low_position)
            highs.append((1 << width) - 1 - high_position)
        self._window = torch.tensor(lows), torch.tensor(highs)

    def histogram_window(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(low, high) int64 [N] digits the next histogram pass collects within (a task with
        [2^16, 2^16] collects nothing), or None."""
        return self._window

    @staticmethod
    def counts_partial(counts: torch.Tensor) -> SelectPartial:
        """Counts [N, 2^width] of the digits `histogram_digit` names, as a partial."""
        return list(counts)

    def new_histograms(self) -> Histograms:
        """Empty Histograms for the next pass to count into (and collect in, with a window)."""
        _, _, width = self.histogram_digit()
        counts = torch.zeros(len(self._ks), 1 << width, dtype=torch.int64)
        return Histograms(counts, self._window is not None, self._window_limit)

    def finish_pass(self, total: SelectPartial) -> None:
        """Pins the next digit of every task from a whole pass's combined observations."""
        histograms = total if isinstance(total, Histograms) else None
        if histograms is not None:  # every task's at once (NumPy: see plan_window)
            flipped = histograms.counts.numpy()[:, ::-1]  # highest digit first
            at_or_above = flipped.cumsum(1)
        for i in range(len(self._ks)):
            if self._free_bits[i] == 0:
                continue
            if self._collecting[i]:
                values = torch.cat(total[i]).sort(descending=True).values
                self._prefix[i] = int(values[self._ks[i] - 1])
                self._free_bits[i] = 0
                continue
            width = min(_DIGIT_BITS, self._free_bits[i])
            if histograms is None:
                counts = total[i].flip(0).cpu().numpy()  # highest digit first
                above = counts.cumsum()
            else:
                counts, above = flipped[i], at_or_above[i]
            position = int(np.searchsorted(above, self._ks[i]))
            digit = (1 << width) - 1 - position
            self._ks[i] -= int(above[position - 1]) if position > 0 else 0
            self._matching[i] = int(counts[position])
            self._prefix[i] = (self._prefix[i] << width) | digit
            self._free_bits[i] -= width
            collected = None
            if histograms is not None and histograms.collected is not None:
                collected = histograms.collected[i]
            if collected is not None:
                low, high = (int(bound[i]) for bound in self._window)
                if low <= digit <= high:
                    whole = np.concatenate([part.numpy() for part in collected] or [[]])
                    self._finish_from_window(i, whole.astype(np.int32, copy=False))
        self._window = None
        self._start_pass()

    def _finish_from_window(self, i: int, collected: np.ndarray) -> None:
        """Pins task i's remaining bits from the bit patterns (int32) its window collected,
        which hold every nonzero entry matching its prefix (pinned just now); the others are
        exact zeros."""
        matches = collected[(collected >> self._free_bits[i]) == self._prefix[i]]  # all >= 0
        zeros = self._matching[i] - matches.size
        assert zeros == 0 or self._prefix[i] == 0, "a window holds every nonzero entry"
        if self._ks[i] > matches.size:  # beyond every nonzero entry: the answer is 0
            value, above, at_value = 0, matches.size, zeros
        else:
            value = int(np.partition(matches, matches.size - self._ks[i])[-self._ks[i]])
            above, at_value = int((matches > value).sum()), int((matches == value).sum())
        self._ks[i] -= above
        self._matching[i] = at_value
        self._prefix[i] = value
        self._free_bits[i] = 0

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


def counts_nonfinite(counts: torch.Tensor, shift: int, width: int) -> int:
    """How many non-finite magnitudes histogram counts of a pass over every entry (shift + width
    = 31, no prefix) hold: Inf and NaN have the largest float32 bit patterns."""
    assert shift + width == 31, "only a first pass sees every entry"
    return int(counts[:, _FLOAT32_INF_BITS >> shift :].sum())
