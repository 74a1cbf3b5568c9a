"""The `r2m` command: `r2m merge` (flags or a recipe file), `r2m report`, `r2m inspect`."""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from r2m_ext._backend import backend_info, version_text
from r2m_ext.api import DEFAULT_IO_THREADS, DEFAULT_SHARD_SIZE, expand_files, merge_files
from r2m_ext.classify import TensorClass, classify
from r2m_ext.detect import BUILTIN_SPEC, SPEC_FORMS
from r2m_ext.engine.budget import format_bytes
from r2m_ext.engine.ranks import DEFAULT_DIST_TIMEOUT_S, launch_environment
from r2m_ext.errors import R2MError
from r2m_ext.io import open_source, parse_size
from r2m_ext.io.checkpoint import EXTERNAL_SHARDS_FLAG
from r2m_ext.io.lora import LoraAdapter, describe_adapter, is_adapter
from r2m_ext.io.output import partial_dir
from r2m_ext.io.writer import tensor_nbytes
from r2m_ext.methods.registry import method_names, method_options
from r2m_ext.options import (
    DEFAULT_EXCLUDE_TRUNCATION,
    DEFAULT_HEAD_PATTERNS,
    ENGINE_FIELDS,
    option_fields,
)
from r2m_ext.recipe import OUT_FORMATS, RECIPE_FILE, load_recipe
from r2m_ext.report import MALFORMED_REPORT_ERRORS, format_report, load_report, save_plots

_DESCRIPTION = """\
Merge fine-tuned models in parameter space with R²M (Real-aware Residual Model Merging) or a
baseline. Every expert must be fine-tuned from the same base model.

  r2m merge --base base/ --expert ff/ --expert fs/ --out merged/          # R²M, defaults
  r2m merge --base base/ --expert ff/ --expert fs/ --out m/ --method ties --density 0.3
  r2m merge --config merged/r2m_recipe.yaml --out again/                  # re-run a merge
  r2m merge --config mergekit.yaml --out merged/        # a mergekit config, mergekit's semantics
  r2m merge --base base/ --expert lora_adapter/ --expert ft/ --out m/   # PEFT LoRA adapters too
  r2m merge ... --max-memory 2GB     # bound everything the merge holds
  r2m report merged/ --plot plots/   # what the merge did, with PNG plots
  r2m inspect base/                  # what is head, matrix, other, before merging
  r2m inspect lora_adapter/          # an adapter's modules, ranks and scalings
  r2m expand merged/r2m_recipe.yaml --expert new_family/ --out merged2/   # add a specialist
  r2m eval --checkpoint merged/ --data test_images/ --json auc.json      # AUC/AP/EER per subset
"""


def _shown(value) -> str:
    return " ".join(value) if isinstance(value, tuple) else str(value)


def _option_help(declared_by: dict) -> str:
    """One flag's help: what it means for the methods that take it, and its defaults."""
    by_text: dict[str, list[str]] = {}
    for label, field in declared_by.items():
        method = label.split(" ")[0]  # a variant ("dare with ...") means what its method means
        users = by_text.setdefault(field.metadata["help"], [])
        if method not in users:
            users.append(method)
    if list(declared_by) == ["engine"]:
        (meaning,) = by_text
    else:
        meaning = "; ".join(f"{', '.join(users)}: {text}" for text, users in by_text.items())
    defaults = {label: field.default for label, field in declared_by.items()}
    if set(map(_shown, defaults.values())) == {"None"}:
        return meaning.replace("%", "%%")
    if len(set(map(_shown, defaults.values()))) == 1:
        default = _shown(next(iter(defaults.values())))
    else:
        default = ", ".join(f"{label} {_shown(value)}" for label, value in defaults.items())
    return f"{meaning} (default: {default})".replace("%", "%%")


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "merge options (named as in the spec; omitted ones take the method's default)"
    )
    declarations = {**method_options(), **{n: {"engine": f} for n, f in ENGINE_FIELDS.items()}}
    for name, declared_by in declarations.items():
        flag = "--" + name.replace("_", "-")
        help_text = _option_help(declared_by)
        meta = next(iter(declared_by.values())).metadata
        if meta["kind"] is bool:
            how = {"action": argparse.BooleanOptionalAction}
        elif meta["kind"] is tuple:
            how = {"nargs": "+", "metavar": "GLOB"}
        else:
            how = {"type": meta["kind"], "choices": meta["choices"]}
        try:
            group.add_argument(flag, default=argparse.SUPPRESS, help=help_text, **how)
        except argparse.ArgumentError:
            raise ValueError(
                f"option {name!r} of method(s) {', '.join(declared_by)} collides with "
                f"r2m merge's own {flag}"
            ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r2m", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = commands.add_parser(
        "merge",
        help="merge experts into one model",
        description="Merge experts fine-tuned from one base into one model (a directory of "
        f"safetensors shards, the base's config files, and {RECIPE_FILE}).",
    )
    merge.add_argument("--base", metavar="PATH", help="the model the experts were fine-tuned from")
    merge.add_argument(
        "--expert",
        metavar="PATH",
        action="append",
        help="a fine-tuned model (repeat: one per expert)",
    )
    merge.add_argument("--out", metavar="DIR", help="output directory (created atomically)")
    merge.add_argument("--method", choices=method_names(), help="merge method (default: r2m)")
    merge.add_argument(
        "--config",
        metavar="RECIPE",
        help=f"a recipe file ({RECIPE_FILE}, as every merge writes) or a mergekit YAML (its "
        "merge_method, base_model, models, parameters); flags given too override it",
    )
    merge.add_argument(
        "--shard-size",
        metavar="SIZE",
        help=f"largest output shard, e.g. 500MB or 5GB (default: {DEFAULT_SHARD_SIZE})",
    )
    merge.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="bound on everything the merge holds: inputs, workspace, caches, output blocks "
        "(default: half the available memory); under torchrun, per rank (default: the ranks of "
        "a machine share that half)",
    )
    merge.add_argument(
        "--io-threads",
        type=int,
        metavar="N",
        help=f"threads reading the next tensors ahead (default: {DEFAULT_IO_THREADS}); with any, "
        "a writer thread also writes behind (0: all I/O on the calling thread)",
    )
    merge.add_argument(
        "--device",
        default="cpu",
        help="where to compute: cpu (default) or cuda; on cuda --max-memory bounds GPU memory",
    )
    merge.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier r2m_ext output at --out (never anything else)",
    )
    merge.add_argument(
        EXTERNAL_SHARDS_FLAG,
        action="store_true",
        help="let a checkpoint index name shard files outside its model directory",
    )
    merge.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted merge into --out from its last complete shard",
    )
    merge.add_argument(
        "--scratch-dir",
        metavar="DIR",
        help="where what the merge keeps between passes goes when --max-memory cannot hold it "
        "(R²M's truncation factors; an anonymous file, gone when the merge ends); default: beside "
        "the partial output; none: recompute instead",
    )
    merge.add_argument(
        "--host-memory",
        metavar="SIZE",
        help="host memory beyond --max-memory that what the merge keeps between passes may use "
        "before --scratch-dir (page-locked on cuda); default: a quarter of the available memory "
        "on cuda, 0 on cpu (--max-memory bounds host memory there)",
    )
    merge.add_argument(
        "--out-format",
        choices=OUT_FORMATS,
        help="safetensors (default): the merged model; peft: for LoRA experts, the merge as a "
        "PEFT LoRA adapter (exact for average, task_arithmetic, r2m, cart)",
    )
    merge.add_argument(
        "--max-rank",
        type=int,
        metavar="R",
        help="with --out-format peft: each module's update compressed to its best rank-R "
        "factors (needed for ties, dare, tsv); the report gives the energy kept per module",
    )
    merge.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_DIST_TIMEOUT_S,
        metavar="SECONDS",
        help="under torchrun (several ranks): how long a rank waits for the others before the "
        f"merge fails on every rank (default: {DEFAULT_DIST_TIMEOUT_S:g})",
    )
    merge.add_argument("--quiet", action="store_true", help="print nothing but errors")
    _add_option_flags(merge)

    report = commands.add_parser(
        "report",
        help="print what a merge did (report.json), optionally as PNG plots",
        description="Summarise OUT/report.json: timings, memory, Real core, eta, and per tensor "
        "the rank kept, the energy the truncation kept, residual norms before/after matching.",
    )
    report.add_argument("out", metavar="OUT", help="a merge output directory (or its report.json)")
    report.add_argument("--rows", type=int, default=20, help="tensors to list (default: 20)")
    report.add_argument("--plot", metavar="DIR", help="save PNG plots into DIR")
    report.add_argument(
        "--tensor",
        action="append",
        default=[],
        metavar="NAME",
        help="also plot the kept singular-value spectrum of this matrix (repeatable)",
    )

    expand = commands.add_parser(
        "expand",
        help="add experts to a previous merge and merge again",
        description="Re-run the merge of RECIPE (its base, experts, method and options) with "
        "the new experts appended: how a new forgery family joins a merged detector.",
    )
    expand.add_argument("recipe", metavar="RECIPE", help=f"the {RECIPE_FILE} of a merge")
    expand.add_argument(
        "--expert", metavar="PATH", action="append", required=True, help="a new expert (repeat)"
    )
    expand.add_argument(
        "--out", metavar="DIR", help="output directory (default: the recipe's, with --overwrite)"
    )
    expand.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier r2m_ext output at --out (never anything else)",
    )
    expand.add_argument(EXTERNAL_SHARDS_FLAG, action="store_true", help="as for r2m merge")
    expand.add_argument("--max-memory", metavar="SIZE", help="as for r2m merge")
    expand.add_argument("--quiet", action="store_true", help="print nothing but errors")

    evaluate = commands.add_parser(
        "eval",
        help="AUC, AP, EER and accuracy of a detector checkpoint per data subset",
        description="Score labelled images with a detector and report AUC, AP, EER and accuracy\n"
        "per subset. DATA is a folder tree SUBSET/real|fake/*.png|jpg or a CSV with columns\n"
        "path,label,subset.\n\nSPEC is one of\n" + SPEC_FORMS.replace("%", "%%"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument(
        "--model",
        metavar="SPEC",
        default=BUILTIN_SPEC,
        help=f"{BUILTIN_SPEC}, timm:NAME, transformers:TYPE or module:function "
        f"(default: {BUILTIN_SPEC})",
    )
    evaluate.add_argument("--checkpoint", metavar="PATH", required=True)
    evaluate.add_argument("--data", metavar="DIR_OR_CSV", required=True)
    evaluate.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    evaluate.add_argument("--batch-size", type=int, default=64, metavar="N")
    evaluate.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
    evaluate.add_argument("--chart", metavar="PNG", help="also save an AUC bar chart")

    inspect = commands.add_parser(
        "inspect",
        help="list a checkpoint's tensors and how a merge would treat each",
        description="List tensors, shapes, dtypes, sizes and classes (head / matrix / other / "
        "non-float / empty), reading headers only.",
    )
    inspect.add_argument("path", metavar="PATH")
    inspect.add_argument(
        "--head-patterns", nargs="+", metavar="GLOB", default=list(DEFAULT_HEAD_PATTERNS)
    )
    inspect.add_argument(
        "--exclude-truncation", nargs="+", metavar="GLOB", default=list(DEFAULT_EXCLUDE_TRUNCATION)
    )
    return parser


def _run_merge(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.config) if args.config else {"options": {}, "experts": []}
    options = dict(recipe["options"])
    options.update({name: getattr(args, name) for name in option_fields() if hasattr(args, name)})
    method = args.method or recipe.get("method") or "r2m"
    base = args.base or recipe.get("base")
    experts = args.expert or recipe["experts"]
    out = args.out or recipe.get("out")
    shard_size = args.shard_size or recipe.get("shard_size") or DEFAULT_SHARD_SIZE
    for value, flag in ((base, "--base"), (experts, "--expert"), (out, "--out")):
        if not value:
            raise R2MError(f"r2m merge needs {flag} (or a --config recipe that sets it)")
    report: dict = {}
    started = time.perf_counter()
    try:
        out_path = merge_files(
            base,
            experts,
            out,
            method,
            shard_size=shard_size,
            max_memory=args.max_memory,
            io_threads=DEFAULT_IO_THREADS if args.io_threads is None else args.io_threads,
            overwrite=args.overwrite,
            resume=args.resume,
            progress=not args.quiet and sys.stderr.isatty(),
            report=report,
            device=args.device,
            allow_external_shards=args.allow_external_shards,
            scratch_dir=args.scratch_dir,
            host_memory=args.host_memory,
            dist_timeout=args.dist_timeout,
            out_format=args.out_format or recipe.get("out_format") or "safetensors",
            max_rank=args.max_rank if args.max_rank is not None else recipe.get("max_rank"),
            **options,
        )
    except KeyboardInterrupt:
        if partial_dir(Path(out)).exists():
            raise _MergeInterrupted(partial_dir(Path(out))) from None
        raise
    if args.quiet or not _speaks_for_the_merge():
        return
    seconds = time.perf_counter() - started
    written = sum(p.stat().st_size for p in out_path.glob("*.safetensors"))
    print(backend_info())
    print(
        f"merged {len(experts)} experts with {method} into {out_path} "
        f"({format_bytes(written)}) in {seconds:.1f} s"
    )
    if "eta" in report:
        coefficients = ", ".join(f"{c:.3f}" for c in report["core_coefficients"])
        print(f"  Real core coefficients: [{coefficients}]   eta: {report['eta']:.4g}")
    print(f"  recipe: {out_path / RECIPE_FILE}   report: r2m report {out_path}")


def _run_report(args: argparse.Namespace) -> None:
    report = load_report(args.out)
    try:
        print(format_report(report, rows=args.rows))
        if args.plot:
            for path in save_plots(report, args.plot, args.tensor):
                print(f"saved {path}")
    except R2MError:  # a ValueError too, with its own message
        raise
    except MALFORMED_REPORT_ERRORS as error:
        raise R2MError(
            f"{args.out}: not a report r2m_ext wrote ({type(error).__name__}: {error})"
        ) from None
    if args.tensor and not args.plot:
        raise R2MError("--tensor chooses spectra to plot: add --plot DIR")


def _speaks_for_the_merge() -> bool:
    """Under torchrun every rank runs the command: rank 0 alone prints what it did."""
    launched = launch_environment()
    return launched is None or launched[0] == 0


def _run_expand(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    out = expand_files(
        args.recipe,
        args.expert,
        args.out,
        overwrite=args.overwrite,
        max_memory=args.max_memory,
        allow_external_shards=args.allow_external_shards,
    )
    if not args.quiet and _speaks_for_the_merge():
        seconds = time.perf_counter() - started
        print(f"added {len(args.expert)} expert(s) and merged again into {out} in {seconds:.1f} s")
        print(f"  recipe: {out / RECIPE_FILE}   report: r2m report {out}")


def _run_eval(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise R2MError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # The detector stack (networks, metrics, images) loads for this command alone.
    from r2m_ext.detect.evaluate import (
        evaluate_images,
        find_images,
        format_metrics,
        load_detector,
        save_metrics,
    )

    model = load_detector(args.model, args.checkpoint)
    subsets = find_images(args.data)
    results = evaluate_images(model, subsets, args.batch_size, device, progress=sys.stderr.isatty())
    print(f"{args.checkpoint} ({args.model}) on {args.data}, {device}:")
    print(format_metrics(results))
    save_metrics(results, args.json, args.chart)
    for path in (args.json, args.chart):
        if path:
            print(f"saved {path}")


def _run_inspect(args: argparse.Namespace) -> None:
    if is_adapter(Path(args.path)):
        print("\n".join(describe_adapter(LoraAdapter(Path(args.path)))))
        return
    checkpoint = open_source(args.path)
    metadata = checkpoint.metadata()
    rows = []
    sizes = Counter()
    counts = Counter()
    for name, (shape, dtype) in metadata.items():
        tensor_class = classify(name, shape, dtype, args.head_patterns, args.exclude_truncation)
        size = tensor_nbytes(shape, dtype)
        sizes[tensor_class.value] += size
        counts[tensor_class.value] += 1
        shape_text = "[" + ", ".join(map(str, shape)) + "]"
        rows.append(
            (
                name,
                tensor_class.value,
                shape_text,
                str(dtype).replace("torch.", ""),
                format_bytes(size),
            )
        )
    headers = ("tensor", "class", "shape", "dtype", "size")
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    print(f"{checkpoint.label}: {len(metadata)} tensors in {len(checkpoint.files)} file(s)")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in rows:
        print("  ".join(value.ljust(w) for value, w in zip(row, widths, strict=True)))
    print()
    for tensor_class in TensorClass:
        print(
            f"{tensor_class.value:>9}: {counts[tensor_class.value]:5d} tensors, "
            f"{format_bytes(sizes[tensor_class.value])}"
        )
    print(f"{'total':>9}: {len(metadata):5d} tensors, {format_bytes(sum(sizes.values()))}")
    from r2m_ext.detect.layouts import detect_layout

    layout = detect_layout(metadata)
    print(f"   layout: {layout.description if layout else 'not a known detector layout'}")


class _MergeInterrupted(Exception):
    def __init__(self, partial: Path):
        self.partial = partial


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _os_error_text(error: OSError) -> str:
    where = f"{error.filename}: " if error.filename is not None else ""
    return f"{where}{error.strerror or error}"


def _print_error(message: str) -> None:
    """One line, whatever names from hostile files or paths it quotes."""
    one_line = message.replace("\r", "\\r").replace("\n", "\\n")
    print(f"r2m: error: {one_line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 the command could not be done (one line on stderr, nothing
    written), 2 the command line is malformed (argparse's usage message), 130 interrupted."""
    # Paths that are not valid UTF-8 (kept by Python as surrogates) must print, not crash.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    # A kill (SIGTERM) stops a merge as Ctrl-C does: complete shards kept for --resume.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.command == "merge":
            if args.shard_size is not None:
                parse_size(args.shard_size)
            _run_merge(args)
        elif args.command == "report":
            _run_report(args)
        elif args.command == "expand":
            _run_expand(args)
        elif args.command == "eval":
            _run_eval(args)
        else:
            _run_inspect(args)
    except R2MError as error:
        _print_error(str(error))
        return 1
    except OSError as error:  # the file system refused something no check above foresaw
        _print_error(_os_error_text(error))
        return 1
    except KeyboardInterrupt:
        print("r2m: interrupted, no output written", file=sys.stderr)
        return 130
    except _MergeInterrupted as interrupted:
        print(
            f"r2m: interrupted, no output written; complete shards kept in {interrupted.partial}:"
            " rerun with --resume",
            file=sys.stderr,
        )
        return 130
    return 0


def run() -> None:
    """The `r2m` command: main(), then an exit that skips the interpreter's teardown. With torch
    imported, that teardown (freeing every module, torch's exit handlers) takes about 0.4 s here
    (`python -c "import r2m_ext.cli"`: 1.41-1.50 s; ending in os._exit: 1.07-1.09 s), a tenth of
    an `average` of 11 GB. By the time main returns, every file the command wrote is closed,
    fsynced and renamed into place and its reader and writer threads are joined, so only the
    standard streams need flushing. An exception out of main exits the ordinary way. atexit
    handlers do not run on this path: cleanup belongs inside main."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # the reader went away (`r2m report OUT | head`)
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
