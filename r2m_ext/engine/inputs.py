"""MergeInputs: the TaskTensors source every method reads from, whole tensors or row blocks, within
the memory budget, with a background reader that loads the next tensors of a pass while the
current one computes. On a CUDA device the reader reads into page-locked host buffers and copies
them to the GPU on a side stream; the compute stream waits for each copy's event."""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from r2m_ext.classify import TensorClass
from r2m_ext.engine.budget import MemoryBudget, format_bytes
from r2m_ext.engine.kept import KeptStore
from r2m_ext.errors import R2MError
from r2m_ext.io.buffers import HostBuffers
from r2m_ext.io.source import TensorSource
from r2m_ext.methods.passes import KeptValues
from r2m_ext.methods.registry import get_method
from r2m_ext.options import COMPUTE_DTYPES, MergeOptions
from r2m_ext.plan import MergePlan, TensorPlan

# Tensors on their way to the compute device, and the event that marks their copies done (None
# where nothing was copied).
Uploaded = tuple[list[torch.Tensor], "torch.cuda.Event | None"]

# Shares of the budget set aside for the background reader's tensors loaded ahead, and for merged
# blocks waiting for the writer thread (several of the largest tensors of a 1 GB ViT-L/14 merge).
PREFETCH_SHARE = 0.2
WRITE_BEHIND_SHARE = 0.05


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or Inf. NaN and Inf propagate into a sum, so one reduction
    decides the usual case; only a non-finite sum (which finite values can also give, by
    overflow) needs the elementwise check."""
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def _has_low_rank_update(source: TensorSource, name: str) -> bool:
    """Whether `source` gives its update of tensor `name` as factors (a LoRA adapter)."""
    has = getattr(source, "has_low_rank_update", None)
    return has is not None and has(name)


def _elements(entry: TensorPlan, rows: slice | None) -> int:
    if rows is None:
        return entry.numel
    return (rows.stop - rows.start) * entry.row_numel


# What the reader loads ahead: a tensor's inputs under its name, a value kept for it under
# (KEPT, its name).
KEPT = "kept"
ReadKey = Hashable


class _Prefetcher:
    """Loads what upcoming steps read (inputs, kept values) on worker threads, in the order
    planned, holding at most `allowance` bytes that have not been taken yet."""

    def __init__(self, threads: int, allowance: int):
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="r2m-read")
        self._threads = threads
        self.allowance = allowance
        self.in_flight = 0
        self._queue: deque[tuple[ReadKey, int, Callable[[], Uploaded | None]]] = deque()
        self._pending: OrderedDict[ReadKey, tuple] = OrderedDict()

    def plan(self, upcoming: list[tuple[ReadKey, int, Callable[[], Uploaded | None]]]) -> None:
        """`upcoming`: (key, bytes, read) in the order the steps will take them."""
        self.drop()
        self._queue = deque(upcoming)
        self._fill()

    def _fill(self) -> None:
        while self._queue and len(self._pending) < 2 * self._threads:
            key, nbytes, read = self._queue[0]
            if self.in_flight + nbytes > self.allowance:
                break
            self._queue.popleft()
            self.in_flight += nbytes
            self._pending[key] = (self._pool.submit(read), nbytes)

    def take(self, key: ReadKey) -> Uploaded | None:
        if key not in self._pending:
            # Read by the caller instead (too large for the allowance, or not reached yet): the
            # reader moves past it, rather than waiting at it for room it will never get.
            if any(queued == key for queued, _, _ in self._queue):
                while self._queue.popleft()[0] != key:
                    pass
                self._fill()
            return None
        future, nbytes = self._pending.pop(key)
        try:
            return future.result()
        finally:
            self.in_flight -= nbytes
            self._fill()

    def drop(self) -> None:
        for future, nbytes in self._pending.values():
            future.cancel()
            self.in_flight -= nbytes
        self._pending.clear()
        self._queue.clear()

    def close(self) -> None:
        self.drop()
        self._pool.shutdown(wait=True, cancel_futures=True)


class MergeInputs:
    """Serves the head-free floating tensors of a merge to a method (the TaskTensors protocol)."""

    def __init__(
        self,
        plan: MergePlan,
        sources: Sequence[TensorSource],
        options: MergeOptions,
        budget: MemoryBudget,
        workspace: HostBuffers | None = None,
        io_threads: int = 0,
        show_progress: bool = False,
        done: set[str] | frozenset[str] = frozenset(),
        device: torch.device | str = "cpu",
        written_behind: Callable[[], int] = lambda: 0,
        scratch_dir: Path | None = None,
        owns: Callable[[str], bool] = lambda name: True,
        writes_updates: bool = False,
        host_memory: int = 0,
    ):
        self.body = plan.body
        # What the write pass produces: this rank's tensors (all on one process) not yet done.
        self.outputs = tuple(t for t in plan.body if t.name not in done and owns(t.name))
        self.n_experts = plan.n_experts
        self.compute_dtype = COMPUTE_DTYPES[options.compute_dtype]
        self.budget = budget
        self._workspace = workspace  # host memory for stacks, kept between steps
        self.device = torch.device(device)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.timings: dict[str, float] = {}
        # On a GPU: torch's peak of allocated device memory as each pass ends. The process-wide
        # peak is never reset here (it is the caller's), so the pass where it first reaches its
        # maximum is the pass that set it.
        self.device_peaks: dict[str, int] = {}
        self.tiled: set[str] = set()  # tensors that did not fit whole and came in row blocks
        self._entries = {t.name: t for t in plan.tensors}
        self._sources = sources  # the base, then the experts
        # Tensors bound for a GPU are read into page-locked memory, so the copy can overlap.
        self._pinned = self.device.type == "cuda"
        self._allow_nonfinite = options.allow_nonfinite
        self._method = get_method(options.method)
        self._show_progress = show_progress
        self._checked: set[tuple] = set()
        self._written_behind = written_behind  # bytes of merged blocks the writer still holds
        # Values bound for the scratch file are written behind, with I/O threads, within the
        # share the statistic passes may hold (R²M's truncation pass holds nothing else there).
        self._kept = KeptStore(
            scratch_dir,
            host_limit=host_memory,
            pin=self._pinned,
            write_behind=self.statistic_allowance() if io_threads > 0 else 0,
        )
        # Bytes of the budget kept values may hold in memory, fixed before the first pass.
        self._kept_allowance = 0
        # Per pass: bytes read from the inputs and from and to the scratch file.
        self.pass_io: dict[str, dict[str, int]] = {}
        self._input_bytes = 0
        self._input_bytes_lock = threading.Lock()  # the reader threads count too
        self.writes_updates = writes_updates
        # Matrices the method merges from the experts' LoRA factors: their dense values are
        # never read, so never read ahead (at most the base is, by the write pass).
        self._from_factors = {
            t.name
            for t in plan.body
            if self._method.merges_factors
            and t.tensor_class is TensorClass.MATRIX
            and all(_has_low_rank_update(source, t.name) for source in sources[1:])
        }
        self._prefetcher = None
        if io_threads > 0:
            self._prefetcher = _Prefetcher(io_threads, int(budget.limit * PREFETCH_SHARE))

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
        self.drop_kept()

    # -- memory model ------------------------------------------------------------------------
    def bytes_per_element(self, entry: TensorPlan, extra_stacks: float = 0) -> float:
        """Bytes one element of `entry` costs in a step, at its peak: while loading, the raw
        inputs and their compute-dtype stack; then the base and stack in the compute dtype,
        `extra_stacks` more [N, ...] stacks of method workspace, the result and its cast."""
        n = self.n_experts
        compute = self.compute_dtype.itemsize
        raw = entry.in_dtype.itemsize
        base_cast = compute if entry.in_dtype != self.compute_dtype else 0
        loading = (n + 1) * raw + n * compute + base_cast
        computing = (n + 1 + extra_stacks * n + 1) * compute + entry.out_dtype.itemsize
        return max(loading, computing)

    def step_budget(self) -> int:
        """Bytes a step may use: the budget less reservations and the reader's and writer's
        allowances. Those are set aside even with no such threads, so block sizes, and with them
        the bits of the result, depend on --max-memory alone, never on --io-threads or timing."""
        return self.budget.free - int(self.budget.limit * (PREFETCH_SHARE + WRITE_BEHIND_SHARE))

    def block_budget(self) -> int:
        """What a step plans on: the step budget as if kept values held their whole allowance.
        Whether a tensor comes whole or in row blocks, and the blocks' sizes (and with them the
        bits of a result), then depend on --max-memory and the tensor alone, never on which
        values the method happens to hold at that moment, which differs between the passes of
        one process and between the ranks of a distributed merge."""
        return self.step_budget() + self._kept.memory_bytes() - self._kept_allowance

    def whole_need(self, entry: TensorPlan, extra_stacks: float = 0) -> int:
        return int(entry.numel * self.bytes_per_element(entry, extra_stacks))

    def whole_base(self, entry: TensorPlan) -> torch.Tensor | None:
        """The base's tensor whole in the compute dtype (checked for NaN/Inf, naming its file),
        for a step that holds it as read, widened and one result beside it; None when that
        step does not fit the budget. For methods that take the experts' updates as factors."""
        need = entry.numel * (entry.in_dtype.itemsize + 2 * self.compute_dtype.itemsize)
        if need > self.block_budget():
            return None
        self.budget.note_step(need + self._in_flight())
        return self.raw(0, entry.name).to(self.compute_dtype)

    def fits_whole(self, entry: TensorPlan, extra_stacks: float = 0) -> bool:
        return self.whole_need(entry, extra_stacks) <= self.block_budget()

    # -- reading -----------------------------------------------------------------------------
    def _read_all(self, name: str) -> Uploaded:
        return self._upload(
            [self._read(source, name, None) for source in range(len(self._sources))]
        )

    def _read(self, source: int, name: str, rows: slice | None) -> torch.Tensor:
        tensor = self._sources[source].read(name, rows, self._pinned)
        with self._input_bytes_lock:
            self._input_bytes += tensor.numel() * tensor.element_size()
        return tensor

    def _upload(self, tensors: list[torch.Tensor]) -> Uploaded:
        """Starts copying host tensors to the compute device, on the side stream so that a
        tensor loads while the one before it computes. Tensors already there stay."""
        if self._copy_stream is None or all(t.device == self.device for t in tensors):
            return tensors, None
        with torch.cuda.stream(self._copy_stream):
            moved = [t.to(self.device, non_blocking=True) for t in tensors]
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
        return moved, copied

    def _ready(self, uploaded: Uploaded) -> list[torch.Tensor]:
        """The uploaded tensors, usable on the compute stream: it waits for the copies' event
        (the host does not), and the caching allocator learns that memory allocated on the copy
        stream is used on the compute stream, so it is not reused before that work is done."""
        tensors, copied = uploaded
        if copied is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)
            for tensor in tensors:
                tensor.record_stream(compute)
        return tensors

    @staticmethod
    def _check_key(source: int, name: str, rows: slice | None) -> tuple:
        return source, name, None if rows is None else (rows.start, rows.stop)

    def _nonfinite_advice(self, entry: TensorPlan) -> str | None:
        """How the error for NaN/Inf in `entry`'s inputs ends, or None where they may pass."""
        reason = self._method.why_finite_required(entry)
        if reason is not None:
            return (
                f"{self._method.name} cannot merge NaN or Inf, even with --allow-nonfinite: "
                + reason
            )
        if self._allow_nonfinite:
            return None
        return "pass --allow-nonfinite / allow_nonfinite=True to merge anyway"

    def _checked_raw(self, source: int, name: str, tensor: torch.Tensor, rows) -> torch.Tensor:
        key = self._check_key(source, name, rows)
        if key in self._checked or not tensor.dtype.is_floating_point:
            return tensor
        advice = self._nonfinite_advice(self._entries[name])
        if advice is None:
            return tensor
        if not all_finite(tensor):
            where = self._sources[source].where(name)
            raise R2MError(f"tensor {name!r} in {where} contains NaN or Inf ({advice})")
        self._checked.add(key)
        return tensor

    def raw(self, source: int, name: str, rows: slice | None = None) -> torch.Tensor:
        (tensor,) = self._ready(self._upload([self._read(source, name, rows)]))
        return self._checked_raw(source, name, tensor, rows)

    def empty_stack(self, shape: Sequence[int]) -> torch.Tensor:
        """An uninitialised [N, *shape] tensor in the compute dtype on the compute device; on
        the host, from the reused workspace buffers: memory already faulted in (8 fresh [3072,
        768] float32 outputs, 75 MB: 17 ms to fault in, against 4-6 ms to write once resident)."""
        shape = (self.n_experts, *shape)
        if self.device.type == "cpu" and self._workspace is not None:
            nbytes = math.prod(shape) * self.compute_dtype.itemsize
            return self._workspace.take(nbytes).view(self.compute_dtype).view(shape)
        return torch.empty(shape, dtype=self.compute_dtype, device=self.device)

    def _stack(
        self, tensors: list[torch.Tensor], task_vectors: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        base = tensors[0].to(self.compute_dtype)
        if not task_vectors:
            return base, torch.stack([t.to(self.compute_dtype) for t in tensors[1:]])
        # Each difference is written straight into the stack (widening on the way, as .to()
        # would, so the same bits as stacking then subtracting): one pass over [N, ...], not two.
        tau = self.empty_stack(base.shape)
        for index, expert in enumerate(tensors[1:]):
            torch.sub(expert, base, out=tau[index])
        return base, tau

    def _whole_raw(self, name: str, extra_stacks: float, purpose: str) -> list[torch.Tensor]:
        """Every input of a whole tensor as read (source 0 the base), once the step (inputs and
        `extra_stacks` workspace stacks) is known to fit the budget; raises when it does not."""
        entry = self._entries[name]
        need = self.whole_need(entry, extra_stacks)
        if need > self.block_budget():
            raise R2MError(
                f"tensor {name!r} {list(entry.shape)} needs {format_bytes(need)} to {purpose} "
                f"with {self.n_experts} experts, more than --max-memory "
                f"{format_bytes(self.budget.limit)} leaves for one step "
                f"({format_bytes(self.block_budget())}); raise --max-memory"
            )
        self.budget.note_step(need + self._in_flight())
        prefetched = self._prefetcher.take(name) if self._prefetcher is not None else None
        if prefetched is None:
            prefetched = self._read_all(name)
        return self._ready(prefetched)

    def load(
        self,
        name: str,
        extra_stacks: float = 0,
        purpose: str = "merge",
        task_vectors: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, experts [N, *shape]) of a whole tensor in the compute dtype, or with
        `task_vectors` (base, experts - base) in the same memory. Raises when the step (inputs
        and `extra_stacks` workspace stacks) exceeds the budget."""
        tensors = self._whole_raw(name, extra_stacks, purpose)
        checked = [self._checked_raw(s, name, t, None) for s, t in enumerate(tensors)]
        return self._stack(checked, task_vectors)

    def load_raw(
        self, name: str, extra_stacks: float = 0, purpose: str = "merge"
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(base, [experts]) of a whole tensor as read, for fused ops, within the budget of
        `load` with the same workspace. Not yet checked for NaN/Inf: see `raw_blocks`."""
        tensors = self._whole_raw(name, extra_stacks, purpose)
        return tensors[0], tensors[1:]

    def raw_blocks(
        self, entry: TensorPlan, outputs: int = 1
    ) -> Iterator[tuple[slice | None, torch.Tensor, list[torch.Tensor]]]:
        """(rows, base rows, [expert rows]) as read, in their own dtype: for fused ops that
        widen on load and produce `outputs` compute-dtype results per element."""
        n = self.n_experts
        compute = self.compute_dtype.itemsize
        per_element = (
            (n + 1) * entry.in_dtype.itemsize + outputs * compute + entry.out_dtype.itemsize
        )
        for rows in self._row_blocks(entry, per_element):
            self.budget.note_step(int(per_element * _elements(entry, rows)) + self._in_flight())
            prefetched = None
            if rows is None and self._prefetcher is not None:
                prefetched = self._prefetcher.take(entry.name)
            if prefetched is None:
                prefetched = self._upload([self._read(s, entry.name, rows) for s in range(n + 1)])
            tensors = self._ready(prefetched)
            yield rows, tensors[0], tensors[1:]

    def statistic_allowance(self) -> int:
        # The share set aside for merged blocks waiting for the writer, idle before the write
        # pass (steps never plan on it: step_budget).
        return int(self.budget.limit * WRITE_BEHIND_SHARE)

    def raw_rows(
        self, entry: TensorPlan, rows: slice | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        n = self.n_experts
        need = (n + 1) * entry.in_dtype.itemsize * _elements(entry, rows)
        if need > self.block_budget():
            return None
        self.budget.note_step(need + self._in_flight())
        tensors = self._ready(self._upload([self._read(s, entry.name, rows) for s in range(n + 1)]))
        return tensors[0], tensors[1:]

    def check_finite(
        self,
        entry: TensorPlan,
        rows: slice | None,
        result: torch.Tensor,
        zero_weight_sources: Iterable[int] = (),
        held: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """The NaN/Inf check of a raw block, from what was computed of it. A NaN or Inf input
        that enters a sum, difference or product with a nonzero weight makes the result NaN or
        Inf (Inf - Inf is NaN), and the kernels never simplify x - b algebraically; so a finite
        result proves those inputs finite, and one reduction over the result replaces N + 1 over
        the inputs. Sources with zero weight, and a non-finite result, are checked input by input
        (the latter re-reads the block to name the file). Sources a finite result proved finite
        are not checked again when a later pass loads the same block (R²M's truncation pass after
        its Gram pass: 9 reductions over a ViT-B/16 tensor's inputs, 0.4 s of a 10 s merge)."""
        if self._nonfinite_advice(entry) is None:
            return
        suspects = list(zero_weight_sources)
        if not all_finite(result):
            suspects = range(self.n_experts + 1)
        else:
            proven = set(range(self.n_experts + 1)).difference(suspects)
            self._checked.update(self._check_key(s, entry.name, rows) for s in proven)
        for source in suspects:
            if held is not None:  # the block's inputs as read: checked where they are
                self._checked_raw(source, entry.name, held[source], rows)
            else:
                self.raw(source, entry.name, rows)

    def _row_blocks(self, entry: TensorPlan, per_element: float) -> Iterator[slice | None]:
        """None (the whole tensor) when it fits the step budget, else slices of rows that do."""
        rows = entry.rows
        per_row = max(1, entry.row_numel) * per_element
        fit = int(self.block_budget() // per_row)
        if fit >= rows or not entry.shape:
            yield None
            return
        if fit < 1:
            raise R2MError(
                f"tensor {entry.name!r} {list(entry.shape)} needs {format_bytes(int(per_row))} "
                f"per row with {self.n_experts} experts, more than --max-memory "
                f"{format_bytes(self.budget.limit)} leaves for one step; raise --max-memory"
            )
        self.tiled.add(entry.name)
        for start in range(0, rows, fit):
            yield slice(start, min(rows, start + fit))

    def blocks(
        self, entry: TensorPlan, extra_stacks: float = 0
    ) -> Iterator[tuple[slice | None, torch.Tensor, torch.Tensor]]:
        """(rows, base rows, experts rows [N, rows, ...]) covering `entry`: the whole tensor when
        it fits the budget (rows None), else blocks of rows sized to fit. A block's size assumes
        it is the only one held: callers drop every tensor made from a block before asking for
        the next (`del` at the end of the loop body), and so does this generator."""
        per_element = self.bytes_per_element(entry, extra_stacks)
        for rows in self._row_blocks(entry, per_element):
            if rows is None:
                yield None, *self.load(entry.name, extra_stacks)
                continue
            self.budget.note_step(int(per_element * _elements(entry, rows)) + self._in_flight())
            tensors = [self.raw(s, entry.name, rows) for s in range(self.n_experts + 1)]
            base, experts = self._stack(tensors)
            del tensors  # the raw rows: the memory model frees them once stacked
            yield rows, base, experts
            del base, experts

    # -- what methods hold beside the steps -----------------------------------------------------
    def _try_reserve(self, nbytes: int, keep_free: int) -> bool:
        if self.block_budget() - nbytes < keep_free:
            return False
        return self.budget.try_reserve(nbytes)

    @contextlib.contextmanager
    def workspace(
        self, entry: TensorPlan, nbytes: int, purpose: str, block_stacks: float
    ) -> Iterator[None]:
        one_row = self.whole_need(entry, block_stacks) // entry.rows + 1
        if not self._try_reserve(nbytes, keep_free=one_row):
            raise R2MError(
                f"tensor {entry.name!r} {list(entry.shape)} needs "
                f"{(nbytes + one_row) / 1e6:.2f} MB to {purpose} with {self.n_experts} experts, "
                "more than --max-memory leaves; raise --max-memory"
            )
        try:
            yield
        finally:
            self.budget.release(nbytes)

    def declare_kept(self, kept: KeptValues | None) -> None:
        """What the method will keep; raises, before any tensor is read, when neither memory
        nor the scratch directory can hold it."""
        if kept is None:
            return
        # Kept values leave room for a whole step of any later tensor that fits whole at all.
        keep_free = max((self.whole_need(t, kept.step_stacks) for t in kept.steps_after), default=0)
        self._kept_allowance = max(0, min(kept.total_bytes, self.step_budget() - keep_free))
        scratch = self._kept.scratch_dir
        beyond_memory = kept.total_bytes - self._kept_allowance - self._kept.host_limit
        if scratch is None or beyond_memory <= 0:
            return
        free = shutil.disk_usage(scratch).free
        if free < beyond_memory:
            raise R2MError(
                f"{scratch}: the scratch space for what the merge keeps between passes needs "
                f"{format_bytes(beyond_memory)}, {format_bytes(free)} is free; pass "
                "--scratch-dir DIR on a disk with room, or --scratch-dir none to recompute "
                "instead"
            )

    def keep(self, key: str, values: tuple[torch.Tensor, ...]) -> None:
        nbytes = sum(v.numel() * v.element_size() for v in values)
        in_memory = self._kept.memory_bytes() + nbytes <= self._kept_allowance
        in_memory = in_memory and self.budget.try_reserve(nbytes)
        self._kept.put(key, values, nbytes, in_memory)

    def kept_where(self, key: str) -> str | None:
        return self._kept.where(key)

    def _read_kept(self, key: str) -> Uploaded | None:
        """A value kept off the compute device, on its way back there (for the reader)."""
        taken = self._kept.take(key)
        return None if taken is None else self._upload(list(taken[0]))

    def take(self, key: str) -> tuple[torch.Tensor, ...] | None:
        if self._prefetcher is not None:
            prefetched = self._prefetcher.take((KEPT, key))
            if prefetched is not None:
                return tuple(self._ready(prefetched))
        taken = self._kept.take(key)
        if taken is None:
            return None
        values, reserved = taken
        self.budget.release(reserved)
        return tuple(self._ready(self._upload(list(values))))

    @property
    def host_tier(self) -> dict[str, int]:
        """The host tier's limit and the most it held."""
        return {"limit": self._kept.host_limit, "peak_kept": self._kept.host_peak}

    def drop_kept(self) -> None:
        """Releases what was kept and never taken (tensors a resumed merge had written), and the
        scratch file."""
        self.budget.release(self._kept.memory_bytes())
        self._kept.close()

    def _in_flight(self) -> int:
        """Bytes held outside the step: tensors read ahead and blocks waiting to be written."""
        read_ahead = self._prefetcher.in_flight if self._prefetcher is not None else 0
        return read_ahead + self._written_behind()

    def low_rank_updates(self, entry: TensorPlan) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Every expert's update of a matrix as factors (left [m, r_i], right [n, r_i], in the
        compute dtype on the compute device, update = left @ right^T) where every expert is a
        low-rank update of the base there (LoRA adapters); else None, and the method forms the
        task vectors from the inputs. Factors that are not finite also give None: the dense
        path then names the file."""
        if entry.tensor_class is not TensorClass.MATRIX:
            return None
        factors = []
        for source in self._sources[1:]:
            update = getattr(source, "low_rank_update", None)
            found = update(entry.name) if update is not None else None
            if found is None or not all(bool(torch.isfinite(f).all()) for f in found):
                return None
            factors.append(tuple(f.to(self.device, self.compute_dtype) for f in found))
        return factors

    def head(self, entry: TensorPlan) -> torch.Tensor:
        if entry.head_only_in_base:
            # Spec §4: a head tensor no expert has counts as 0.
            return torch.zeros(entry.shape, dtype=self.compute_dtype, device=self.device)
        total = self.raw(1, entry.name).to(self.compute_dtype).clone()
        for i in range(2, self.n_experts + 1):
            total += self.raw(i, entry.name).to(self.compute_dtype)
        return total / self.n_experts

    @property
    def input_bytes_read(self) -> int:
        """Bytes read from the inputs so far, in every pass and outside them (heads)."""
        with self._input_bytes_lock:
            return self._input_bytes

    def _io_counts(self) -> dict[str, int]:
        with self._input_bytes_lock:
            read = self._input_bytes
        return {
            "input_bytes_read": read,
            "scratch_bytes_written": self._kept.scratch_bytes_written,
            "scratch_bytes_read": self._kept.scratch_bytes_read,
        }

    # -- passes ------------------------------------------------------------------------------
    def pass_over(
        self, items: Iterable[TensorPlan], description: str, read_ahead: bool = True
    ) -> Iterator[TensorPlan]:
        """`items` in order, as one pass: the reader loads ahead the tensors that fit whole
        (unless the pass reads only parts of them: not `read_ahead`) and, before each, what was
        kept for it in host memory on a GPU or on disk; a progress bar shows on a terminal, and
        the pass's time goes into `timings`. When the pass ends, the values it kept are where
        they will stay (`kept_where`)."""
        items = list(items)
        # Counted from before the reader starts on this pass's tensors.
        before = self._io_counts()
        if self._prefetcher is not None and not read_ahead:
            self._prefetcher.drop()
        elif self._prefetcher is not None:
            fits = self.block_budget()
            upcoming = []
            for t in items:
                if self._kept.is_held_off_device(t.name):
                    read = functools.partial(self._read_kept, t.name)
                    upcoming.append(((KEPT, t.name), self._kept.nbytes_of(t.name), read))
                if self.whole_need(t) <= fits and t.name not in self._from_factors:
                    raw_bytes = (self.n_experts + 1) * t.numel * t.in_dtype.itemsize
                    upcoming.append((t.name, raw_bytes, functools.partial(self._read_all, t.name)))
            self._prefetcher.plan(upcoming)
        iterator = items
        if self._show_progress:
            try:
                from tqdm.auto import tqdm

                iterator = tqdm(items, desc=description, unit="tensor", leave=False)
            except ImportError:
                pass
        started = time.perf_counter()
        yield from iterator
        self._kept.flush()
        self.timings[description] = (
            self.timings.get(description, 0.0) + time.perf_counter() - started
        )
        counts = self.pass_io.setdefault(description, dict.fromkeys(before, 0))
        for what, now in self._io_counts().items():
            counts[what] += now - before[what]
        if self.device.type == "cuda":
            self.device_peaks[description] = torch.cuda.max_memory_allocated(self.device)
