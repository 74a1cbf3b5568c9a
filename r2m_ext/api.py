"""The Python API: `merge` on state dicts in memory, `merge_files` on checkpoints on disk."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import stat
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from r2m_ext.engine import MemoryBudget, MergeInputs, run_merge
from r2m_ext.engine.budget import (
    default_budget,
    host_tier_bytes,
    peak_rss_bytes,
    return_large_frees_to_os,
)
from r2m_ext.engine.inputs import WRITE_BEHIND_SHARE
from r2m_ext.engine.ranks import DEFAULT_DIST_TIMEOUT_S, Ranks, join_ranks
from r2m_ext.errors import R2MError
from r2m_ext.io import ShardWriter, StateDictSource, TensorSource, open_source, parse_size
from r2m_ext.io.adapter_output import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterOutput,
)
from r2m_ext.io.buffers import HostBuffers
from r2m_ext.io.checkpoint import PICKLE_SUFFIXES
from r2m_ext.io.output import (
    MANIFEST_FILE,
    check_inputs_apart,
    check_output_target,
    partial_dir,
)
from r2m_ext.io.paths import stat_path
from r2m_ext.io.writer import SINGLE_FILE
from r2m_ext.methods.registry import get_method, reserve
from r2m_ext.options import resolve_options
from r2m_ext.plan import plan_merge
from r2m_ext.recipe import OUT_FORMATS, RECIPE_FILE, Recipe, load_recipe
from r2m_ext.report import REPORT_FILE, combine_rank_reports, sum_counts

DEFAULT_SHARD_SIZE = "5GB"
# An adapter is one file, however large.
_MAX_SHARD_BYTES = 2**62
DEFAULT_IO_THREADS = 2
# In memory the inputs are already resident: the budget only bounds the engine's own workspace.
_IN_MEMORY_BUDGET = 1 << 62
# Free host buffers (reads that cannot be mapped, stacks of task vectors) kept for reuse, as a
# share of --max-memory: enough for one step's inputs of a typical layer, and the only memory
# beyond the budget the engine holds on purpose.
_RETAINED_HOST_BUFFERS_SHARE = 0.125
# In memory: the stacks of the largest ViT-L/14 or 1B-decoder layers, little beside the models.
_IN_MEMORY_RETAINED_BYTES = 1 << 30
# Non-weight files of a base directory that are copied next to the merged weights.
_MAX_COPIED_FILE_BYTES = 50 * 10**6
_NOT_COPIED_SUFFIXES = (".safetensors", ".msgpack", ".h5", ".ckpt", ".onnx", *PICKLE_SUFFIXES)
_NOT_COPIED_NAMES = {RECIPE_FILE, REPORT_FILE, MANIFEST_FILE}


def merge(
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    method: str = "r2m",
    *,
    report: dict | None = None,
    progress: bool = False,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """Merges expert state dicts fine-tuned from `base` with `method`.

    `options` are named exactly as in ../shared/r2m-spec.md (e.g. alpha=0.6, rank_ratio=0.1,
    svd="exact"); omitted ones take the method's default, and one the method does not use is an
    error. Returns a new state dict: every base tensor (plus heads only the experts have) in base
    order, floating tensors in the base's dtype unless out_dtype is given. Pass a dict as
    `report` to receive what the method computed (for R²M: Gram, core coefficients, eta, ...).
    """
    resolved = resolve_options(method, **options)
    sources = [StateDictSource(base, "base")]
    sources += [StateDictSource(e, f"expert {i}") for i, e in enumerate(experts)]
    plan = plan_merge(sources, resolved)
    first = next((t for t in base.values() if isinstance(t, torch.Tensor)), None)
    inputs = MergeInputs(
        plan,
        sources,
        options=resolved,
        budget=MemoryBudget(_IN_MEMORY_BUDGET),
        workspace=HostBuffers(_IN_MEMORY_RETAINED_BYTES),
        show_progress=progress,
        device=first.device if first is not None else "cpu",
    )
    blocks: dict[str, list[torch.Tensor]] = {}
    for name, _, values in run_merge(plan, inputs, resolved, {} if report is None else report):
        blocks.setdefault(name, []).append(values)
    return {
        name: parts[0] if len(parts) == 1 else torch.cat(parts) for name, parts in blocks.items()
    }


def _compute_device(device: str | torch.device) -> torch.device:
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise R2MError(
            f"device {device!r} is not a device torch knows (cpu, cuda, cuda:1)"
        ) from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise R2MError(f"device {device!r}: this torch sees no CUDA GPU")
    if chosen.type not in ("cpu", "cuda"):
        raise R2MError(f"device {device!r}: merges run on cpu or cuda")
    return chosen


def _output_path(out: str | Path) -> Path:
    """`out` made absolute without resolving its last component (a symbolic link there is
    refused, not followed), so that its name and parent are real ones even for '.'."""
    path = Path(os.path.abspath(out))
    if not path.name:
        raise R2MError(f"output {out} is a filesystem root; name a directory to create")
    return path


def _clear_stale_partial(out: Path) -> None:
    """With --overwrite and no --resume, an interrupted merge's partial directory goes."""
    partial = partial_dir(out)
    found = stat_path(partial, follow_symlinks=False)
    if found is None:
        return
    if not stat.S_ISDIR(found.st_mode):
        raise R2MError(f"{partial} is not a directory r2m_ext made; remove it yourself")
    shutil.rmtree(partial)


def _copied_files(base: TensorSource) -> list[Path]:
    if base.directory is None:
        return []
    weights = set(base.files)
    return sorted(
        path
        for path in base.directory.iterdir()
        if path.is_file()
        and path not in weights
        and not path.name.startswith(".")
        and path.suffix not in _NOT_COPIED_SUFFIXES
        and not path.name.endswith(".index.json")
        and path.name not in _NOT_COPIED_NAMES
        and path.stat().st_size <= _MAX_COPIED_FILE_BYTES
    )


def merge_files(
    base: str | Path,
    experts: Sequence[str | Path],
    out: str | Path,
    method: str = "r2m",
    *,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    max_memory: str | int | None = None,
    io_threads: int = DEFAULT_IO_THREADS,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    report: dict | None = None,
    device: str = "cpu",
    allow_external_shards: bool = False,
    scratch_dir: str | Path | None = None,
    host_memory: str | int | None = None,
    dist_timeout: float = DEFAULT_DIST_TIMEOUT_S,
    out_format: str = "safetensors",
    max_rank: int | None = None,
    **options: Any,
) -> Path:
    """Merges checkpoints on disk into the directory `out` (Hugging Face layout), streaming.

    Inputs: .safetensors files, Hugging Face directories (sharded with an index, or one file), or
    .bin/.pt/.pth (loaded with weights_only=True). Tensors are read one at a time, or in row
    blocks, so that everything the merge holds stays within `max_memory` (default: half the
    available memory); `io_threads` background readers load the next tensors meanwhile, and
    with any, a writer thread writes merged tensors while the next ones compute.
    Writes model.safetensors (or shards of at most `shard_size` plus
    model.safetensors.index.json) as the merge produces it, copies config.json and other small
    non-weight files of a base directory, and writes r2m_recipe.yaml and report.json.
    All or nothing: on an error no output is left behind; after an interruption the complete
    shards are kept beside `out`, and `resume=True` with the same recipe continues.
    `out` may be absent or an empty directory; `overwrite=True` also replaces an unchanged
    earlier r2m_ext output there, and nothing else (io/output.py). No file the merge reads may
    be inside `out`, through any symbolic link. An index may name shards outside its model's
    directory only with `allow_external_shards=True`.
    `device="cuda"` computes on the GPU: tensors are read into page-locked buffers and copied on a
    side stream while the previous one computes, and `max_memory` (default: half the GPU's free
    memory) bounds GPU memory. What a method keeps between passes (R²M's truncation factors)
    stays in memory while the budget allows, else in host memory within `host_memory` (on
    `device="cuda"` page-locked; default there a quarter of the available host memory, on the
    CPU 0, as `max_memory` already bounds host memory), else goes to an anonymous scratch file
    in `scratch_dir` (default: beside the partial output; "none": recompute it instead, with the
    same bits), written behind by a background thread and read back ahead of the write pass.
    Under torchrun (or any launcher that sets RANK and WORLD_SIZE), or inside a process group
    the caller initialised, the merge runs on every rank: each reads, merges and writes its own
    share of the tensors (`max_memory` per rank), statistics are exchanged so that the output
    is bitwise the single-process one, and rank 0 publishes it once every rank's share is on
    disk; a failure on any rank ends every rank within `dist_timeout` seconds. Returns `out`.
    """
    started = time.perf_counter()
    ranks = join_ranks(str(device), dist_timeout)
    try:
        # Under several ranks every failure, here or on another rank, ends every rank with the
        # first failing rank's message; rank 0 publishes the output only if none failed.
        ranks.exchange(
            lambda: _merge_files_on_rank(
                ranks,
                started,
                base,
                experts,
                out,
                method,
                shard_size=shard_size,
                max_memory=max_memory,
                io_threads=io_threads,
                overwrite=overwrite,
                resume=resume,
                progress=progress,
                report=report,
                device=device,
                allow_external_shards=allow_external_shards,
                scratch_dir=scratch_dir,
                host_memory=host_memory,
                out_format=out_format,
                max_rank=max_rank,
                options=options,
            )
        )
    finally:
        ranks.close()
    return _output_path(out)


def _merge_files_on_rank(
    ranks: Ranks,
    started: float,
    base: str | Path,
    experts: Sequence[str | Path],
    out: str | Path,
    method: str,
    *,
    shard_size: str | int,
    max_memory: str | int | None,
    io_threads: int,
    overwrite: bool,
    resume: bool,
    progress: bool,
    report: dict | None,
    device: str,
    allow_external_shards: bool,
    scratch_dir: str | Path | None,
    host_memory: str | int | None,
    out_format: str,
    max_rank: int | None,
    options: dict[str, Any],
) -> None:
    """merge_files' work on one rank (the whole merge on a process of its own)."""
    return_large_frees_to_os()
    if out_format == "peft":
        # An adapter's factors come from merged - base: taken in float32 unless told, so that
        # the output dtype's rounding (bf16: a tenth of a LoRA update's energy) is not factored.
        options = {"out_dtype": "float32", **options}
    resolved = resolve_options(method, **options)
    out = _output_path(out)
    base_path, expert_paths = Path(base), [Path(e) for e in experts]
    shard_bytes = parse_size(shard_size)
    device, sharing = ranks.device_and_share(device)
    compute_device = _compute_device(device)
    if max_memory is None and sharing > 1:
        # The default budget is per rank: the ranks of a machine share its memory.
        max_memory = default_budget(compute_device) // sharing
    budget = MemoryBudget(max_memory, compute_device)
    host_limit = host_tier_bytes(host_memory, compute_device, sharing)
    if io_threads < 0:
        raise R2MError(f"io_threads must be >= 0, got {io_threads}")
    sources: list[TensorSource] = []
    buffers = HostBuffers(int(budget.limit * _RETAINED_HOST_BUFFERS_SHARE))
    try:
        for path in [base_path, *expert_paths]:
            sources.append(
                open_source(
                    path,
                    base=sources[0] if sources else None,
                    buffers=buffers,
                    allow_external_shards=allow_external_shards,
                )
            )
        copied = _copied_files(sources[0])
        files_read = [f for source in sources for f in source.files_read] + copied
        check_inputs_apart(out, [base_path, *expert_paths], files_read)
        check_output_target(out, overwrite)
        scratch = _scratch_directory(scratch_dir, partial_dir(out))
        plan = plan_merge(sources, resolved)
        recipe = Recipe(
            base=str(base_path.resolve()),
            experts=tuple(str(p.resolve()) for p in expert_paths),
            options=resolved,
            shard_size=shard_bytes,
            out=str(out.resolve()),
            out_format=out_format,
            max_rank=max_rank,
        )
        layout = [(t.name, t.shape, t.out_dtype) for t in plan.tensors]
        adapter = _adapter_output(out_format, max_rank, plan, sources, resolved.method, ranks)
        single_file = SINGLE_FILE
        if adapter is not None:
            layout, copied = adapter.layout, []  # an adapter directory holds no base files
            single_file, shard_bytes = ADAPTER_WEIGHTS_FILE, _MAX_SHARD_BYTES
        if ranks.distributed:
            _agree(ranks, recipe, layout, files_read)
            merge_method = get_method(resolved.method)
            n_inputs = plan.n_experts + 1
            ranks.split(
                plan,
                lambda t: n_inputs * t.numel * t.in_dtype.itemsize * merge_method.relative_work(t),
            )
        if overwrite and not resume and ranks.rank == 0:
            _clear_stale_partial(out)
        report = {} if report is None else report
        # With I/O threads, a writer thread writes and fsyncs while the next tensors compute.
        write_behind = int(budget.limit * WRITE_BEHIND_SHARE) if io_threads > 0 else 0
        with ShardWriter(
            out,
            layout,
            shard_bytes,
            recipe.identity(),
            resume,
            write_behind,
            overwrite,
            ranks,
            single_file,
        ) as writer:
            done = writer.done_names
            if adapter is not None and done:  # its one file is complete: nothing to merge
                done = {t.name for t in plan.tensors}
            inputs = MergeInputs(
                plan,
                sources,
                options=resolved,
                budget=budget,
                workspace=buffers,
                io_threads=io_threads,
                show_progress=progress and ranks.rank == 0,
                done=done,
                device=compute_device,
                written_behind=lambda: writer.queued_bytes,
                scratch_dir=scratch,
                host_memory=host_limit,
                owns=ranks.owns,
                writes_updates=adapter is not None,
            )

            def merge_share() -> dict:
                for name, rows, values in run_merge(plan, inputs, resolved, report, done, ranks):
                    if adapter is None:
                        writer.write(name, values.cpu())
                        continue
                    for key, tensor in adapter.convert(name, rows, values.cpu()):
                        writer.write(key, tensor)
                written = writer.finish_share()
                return {
                    "written": written,
                    "report": report,
                    "rank": {
                        **ranks.describe(),
                        "tensors": sum(ranks.owns(t.name) for t in plan.tensors),
                        "input_bytes": sum(
                            (plan.n_experts + 1) * t.numel * t.in_dtype.itemsize
                            for t in plan.tensors
                            if ranks.owns(t.name)
                        ),
                        "input_bytes_read": inputs.input_bytes_read,
                        "timings_s": dict(inputs.timings),
                        "io_bytes": inputs.pass_io,
                        "peak_rss": peak_rss_bytes(),
                        **(
                            {"device_peak_after_pass": inputs.device_peaks}
                            if inputs.device_peaks
                            else {}
                        ),
                    },
                    "tiled": sorted(inputs.tiled),
                }

            try:
                shares = ranks.exchange(merge_share)
            finally:
                inputs.close()
            if ranks.rank != 0:
                return
            if ranks.distributed:
                writer.note_shares([share["written"] for share in shares])
                report.clear()
                report.update(
                    combine_rank_reports(
                        [share["report"] for share in shares],
                        get_method(resolved.method).summed_report_keys,
                        [t.name for t in plan.tensors],
                    )
                )
            for path in copied:
                writer.copy_file(path)
            writer.add_file(RECIPE_FILE, recipe.to_yaml())
            report.update(
                method=resolved.method,
                timings_s={**inputs.timings, "total": time.perf_counter() - started},
                memory={
                    "max_memory": budget.limit,
                    "peak_accounted": budget.peak,
                    "peak_rss": peak_rss_bytes(),
                    "host_memory": inputs.host_tier,
                    **(
                        {"device_peak_after_pass": inputs.device_peaks}
                        if inputs.device_peaks
                        else {}
                    ),
                },
                tiled_tensors=sorted({name for share in shares for name in share["tiled"]}),
                io_bytes=sum_counts([share["rank"]["io_bytes"] for share in shares]),
                resumed_shards=writer.resumed,
            )
            if ranks.distributed:
                report["ranks"] = [share["rank"] for share in shares]
            if adapter is not None:
                writer.add_file(ADAPTER_CONFIG_FILE, adapter.config_text())
                report["adapter"] = {"max_rank": max_rank, "modules": adapter.module_reports}
            writer.add_file(REPORT_FILE, json.dumps(report, indent=1) + "\n")
    finally:
        for source in sources:
            source.close()


def _adapter_output(
    out_format: str, max_rank: int | None, plan, sources, method: str, ranks: Ranks
) -> AdapterOutput | None:
    """What turns the merge into a PEFT adapter, for out_format "peft"; None for a model."""
    if out_format not in OUT_FORMATS:
        raise R2MError(f"out_format must be one of {', '.join(OUT_FORMATS)}, got {out_format!r}")
    if out_format == "safetensors":
        if max_rank is not None:
            raise R2MError("--max-rank applies to --out-format peft (an adapter's rank)")
        return None
    if ranks.distributed:
        raise R2MError("--out-format peft runs on one process; not yet under torchrun")
    in_span = get_method(method).update_in_expert_span
    return AdapterOutput(plan, sources, in_span, max_rank, method)


def _agree(ranks: Ranks, recipe: Recipe, layout, files_read: Sequence[Path]) -> None:
    """Refuses, on every rank and before any tensor is read, ranks that were started with
    different arguments or see different inputs: a digest of the recipe, the plan's layout and
    the size of every input file, compared across ranks."""
    described = {
        "recipe": recipe.identity(),
        "out": recipe.out,
        "layout": [[name, list(shape), str(dtype)] for name, shape, dtype in layout],
        "files": [[str(path), path.stat().st_size] for path in files_read],
    }
    text = json.dumps(described, sort_keys=True, default=str)
    digests = ranks.exchange(lambda: hashlib.sha256(text.encode()).hexdigest())
    differing = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
    if differing:
        raise R2MError(
            f"rank(s) {', '.join(map(str, differing))} of {ranks.world} were started with other "
            "arguments or see other input files than rank 0 (recipe, tensors or file sizes "
            "differ); start every rank with the same command on the same files"
        )


def _scratch_directory(given: str | Path | None, partial: Path) -> Path | None:
    """Where the scratch file goes: the partial output directory unless told; None for "none"."""
    if given is None:
        return partial
    if str(given) == "none":
        return None
    directory = Path(given)
    found = stat_path(directory)
    if found is None or not stat.S_ISDIR(found.st_mode):
        raise R2MError(f"--scratch-dir {directory}: not a directory")
    return directory


def merge_config(config: str | Path, out: str | Path | None = None, **merge_arguments: Any) -> Path:
    """Runs the merge a config file describes: an r2m_ext recipe (r2m_recipe.yaml) or a mergekit
    YAML (its `merge_method`, `base_model`, `models` and `parameters`, with mergekit's semantics:
    README, "Coming from mergekit"), as `r2m merge --config` does. `merge_arguments` go to
    `merge_files` (max_memory, overwrite, report, ...) and override the config's options and
    shard size where they name them."""
    fields = load_recipe(config)
    if not fields["base"] or not fields["experts"]:
        raise R2MError(f"{config}: the config names no base or no experts")
    return _merge_fields(config, fields, fields["experts"], out, merge_arguments)


def _merge_fields(
    config: str | Path,
    fields: dict,
    experts: Sequence[str],
    out: str | Path | None,
    merge_arguments: dict[str, Any],
) -> Path:
    """merge_files with a loaded config's base, method, options and shard size, into `out`
    (default: the config's own output); arguments given here override the config's."""
    target = out if out is not None else fields["out"]
    if target is None:
        raise R2MError(f"{config}: the recipe has no output directory; give one")
    arguments = {
        "shard_size": fields["shard_size"] or DEFAULT_SHARD_SIZE,
        **{k: fields[k] for k in ("out_format", "max_rank") if fields.get(k) is not None},
        **fields["options"],
        **merge_arguments,
    }
    return merge_files(fields["base"], experts, target, fields["method"], **arguments)


def expand_files(
    recipe: str | Path,
    new_experts: Sequence[str | Path],
    out: str | Path | None = None,
    **merge_arguments: Any,
) -> Path:
    """Adds experts to a previous merge: the recipe's base, experts, method and options, plus
    `new_experts`, merged again into `out` (default: the recipe's own output, which then needs
    overwrite=True). `merge_arguments` go to `merge_files` (max_memory, overwrite, report, ...)
    and override the recipe's options and shard size where they name them."""
    fields = load_recipe(recipe)
    if not fields["base"] or not fields["experts"]:
        raise R2MError(f"{recipe}: the recipe names no base or no experts to expand")
    known = set(fields["experts"])
    added = []
    for expert in new_experts:
        resolved = str(Path(expert).resolve())
        if resolved in known:
            raise R2MError(f"{expert}: already an expert of {recipe}")
        known.add(resolved)
        added.append(resolved)
    if not added:
        raise R2MError(f"{recipe}: name at least one new expert to add")
    return _merge_fields(recipe, fields, [*fields["experts"], *added], out, merge_arguments)


# A method option named like a keyword of these would be taken by the keyword.
for _function in (merge, merge_files):
    reserve(inspect.signature(_function).parameters, f"r2m_ext.{_function.__name__}()")
