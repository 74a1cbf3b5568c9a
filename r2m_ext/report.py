"""report.json, which every merge writes beside its output, read back for people: a summary
(`r2m report OUT`) and PNG plots (`--plot DIR`)."""

from __future__ import annotations

import json
from pathlib import Path

from r2m_ext.engine.budget import format_bytes
from r2m_ext.errors import R2MError
from r2m_ext.io.paths import require_regular_file

REPORT_FILE = "report.json"


# What a report.json that r2m_ext did not write (or that was edited) breaks in the formatting.
MALFORMED_REPORT_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)


# Where a method reports tensor by tensor: {tensor name: {...}}, written by the rank merging it.
PER_TENSOR_REPORT = "tensors"


def sum_counts(parts: list) -> int | dict:
    """Counts (ints, or dicts of them, nested) added key by key, keys in first-seen order."""
    if all(isinstance(part, int) for part in parts):
        return sum(parts)
    total: dict = {}
    for part in parts:
        for key, value in part.items():
            total.setdefault(key, []).append(value)
    return {key: sum_counts(values) for key, values in total.items()}


def combine_rank_reports(reports: list[dict], summed_keys, tensor_order: list[str]) -> dict:
    """The report of a distributed merge from its ranks' reports: what the method counted per
    rank (`summed_keys`) added up, the per-tensor entries of every rank in plan order, and every
    other entry as rank 0 has it (each rank computed it from the same exchanged statistics)."""
    combined = dict(reports[0])
    for key in summed_keys:
        if key in combined:
            combined[key] = sum_counts([report[key] for report in reports])
    if PER_TENSOR_REPORT in combined:
        per_tensor = {}
        for report in reports:
            per_tensor.update(report[PER_TENSOR_REPORT])
        combined[PER_TENSOR_REPORT] = {
            name: per_tensor[name] for name in tensor_order if name in per_tensor
        }
    return combined


def load_report(out: str | Path) -> dict:
    path = Path(out) / REPORT_FILE if Path(out).is_dir() else Path(out)
    require_regular_file(path, "merge report")
    try:
        report = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise R2MError(f"{path}: cannot read merge report ({error.strerror or error})") from None
    except (ValueError, RecursionError) as error:
        raise R2MError(
            f"{path}: not a valid merge report ({error or 'nested too deeply'})"
        ) from None
    if not isinstance(report, dict):
        raise R2MError(f"{path}: not a valid merge report (not a JSON object)")
    return report


def _mean(values) -> float:
    return sum(values) / len(values) if values else float("nan")


def format_report(report: dict, rows: int = 20) -> str:
    lines = [f"method: {report.get('method', '?')}"]
    timings = report.get("timings_s", {})
    if timings:
        lines.append("time: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    memory = report.get("memory", {})
    if memory:
        lines.append(
            f"memory: --max-memory {format_bytes(memory['max_memory'])}, engine peak "
            f"{format_bytes(memory['peak_accounted'])}, process peak RSS "
            f"{format_bytes(memory['peak_rss'])}"
        )
    device_peaks = memory.get("device_peak_after_pass", {})
    if device_peaks:
        # Cumulative: the pass where the value first reaches its maximum set the peak.
        lines.append(
            "GPU memory peak after each pass: "
            + ", ".join(f"{k} {format_bytes(v)}" for k, v in device_peaks.items())
        )
    if report.get("tiled_tensors"):
        lines.append(f"tensors read in row blocks: {len(report['tiled_tensors'])}")
    if "eta" in report:
        coefficients = ", ".join(f"{c:.4f}" for c in report["core_coefficients"])
        lines += [
            f"Real core coefficients: [{coefficients}]",
            f"|tau_core| = {report['core_norm']:.6g}, |tau_res| = {report['residual_norm']:.6g}, "
            f"eta = {report['eta']:.6g}",
        ]
        if report.get("residual_cancelled"):
            lines.append(
                "the scaled residuals cancel below the rounding of their Grams: |tau_res| counts "
                "as 0 (compute_dtype float64 resolves it)"
            )
        lines += [
            f"truncation factors kept in memory: {report['factors_cached']}, in host memory: "
            f"{report.get('factors_in_host_memory', 0)}, in the scratch file: "
            f"{report.get('factors_spilled', 0)}, recomputed in the write pass: "
            f"{report['factors_recomputed']}",
        ]
        if "factorisations" in report:
            counts = ", ".join(f"{name} {n}" for name, n in report["factorisations"].items())
            lines.append(f"factorisations ([m, n] matrices factored): {counts}")
        if "residual_norms" in report:
            norms = ", ".join(f"{v:.4g}" for v in report["residual_norms"])
            lines.append(f"per-task residual norms before matching: [{norms}]")
        lines.append("Gram of task vectors:")
        lines += ["  " + "  ".join(f"{v:11.5g}" for v in row) for row in report["gram"]]
    tensors = report.get("tensors", {})
    if tensors:
        header = (
            f"{'tensor':48s} {'class':7s} {'rank':>5s} {'energy kept':>11s} "
            f"{'|r| before':>11s} {'|r| after':>10s}"
        )
        lines += ["", header]
        for name, info in list(tensors.items())[:rows]:
            energy = f"{100 * _mean(info['energy_kept']):10.1f}%" if "energy_kept" in info else ""
            lines.append(
                f"{name[:48]:48s} {info['class']:7s} {str(info.get('rank', '')):>5s} {energy:>11s} "
                f"{_mean(info.get('residual_norm_before', [])):11.4g} "
                f"{_mean(info.get('residual_norm_after', [])):10.4g}"
            )
        if len(tensors) > rows:
            lines.append(f"... {len(tensors) - rows} more (--rows N to show more)")
    return "\n".join(lines)


def save_plots(report: dict, directory: str | Path, tensors: list[str]) -> list[Path]:
    """residual_norms.png, energy_kept.png and one spectrum_*.png per chosen tensor."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise R2MError("plots need matplotlib: pip install matplotlib") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    per_tensor = report.get("tensors", {})
    if not per_tensor:
        raise R2MError("this report has no per-tensor statistics (only R²M records them)")
    saved = []

    figure, axis = plt.subplots(figsize=(7, 4))
    names = [n for n, info in per_tensor.items() if "residual_norm_before" in info]
    tasks = len(per_tensor[names[0]]["residual_norm_before"]) if names else 0
    for task in range(tasks):
        before = sum(per_tensor[n]["residual_norm_before"][task] ** 2 for n in names) ** 0.5
        after = sum(per_tensor[n]["residual_norm_after"][task] ** 2 for n in names) ** 0.5
        axis.bar(
            [task - 0.2],
            [before],
            width=0.4,
            color="tab:blue",
            label="before" if task == 0 else None,
        )
        axis.bar(
            [task + 0.2],
            [after],
            width=0.4,
            color="tab:orange",
            label="after" if task == 0 else None,
        )
    axis.set(
        xlabel="task",
        ylabel="residual norm",
        title="Per-task residual norms, before/after matching",
    )
    axis.legend()
    saved.append(_save(figure, directory / "residual_norms.png"))

    truncated = [
        (n, _mean(info["energy_kept"])) for n, info in per_tensor.items() if "energy_kept" in info
    ]
    if truncated:
        figure, axis = plt.subplots(figsize=(7, 4))
        axis.plot([100 * e for _, e in truncated], marker=".")
        axis.set(
            xlabel="matrix (model order)",
            ylabel="residual energy kept (%)",
            title="Energy kept by the rank truncation",
        )
        saved.append(_save(figure, directory / "energy_kept.png"))

    for name in tensors:
        info = per_tensor.get(name)
        if info is None or "singular_values" not in info:
            raise R2MError(f"tensor {name!r} has no recorded spectrum (only truncated matrices do)")
        figure, axis = plt.subplots(figsize=(7, 4))
        for task, values in enumerate(info["singular_values"]):
            axis.semilogy(range(1, len(values) + 1), values, marker=".", label=f"task {task}")
        axis.set(xlabel="index", ylabel="singular value", title=f"Kept residual spectrum: {name}")
        axis.legend()
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        saved.append(_save(figure, directory / f"spectrum_{safe}.png"))
    return saved


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path
