"""The built-in synthetic deepfake benchmark: the paper's experiment, end to end, on a CPU.

1. θ₀: a small ViT pretrained on real images only (rotation prediction, no labels).
2. One specialist per seen forgery family (fine-tuned from θ₀ on that family's first generator)
   and a joint detector trained on all of them with as many steps as the specialists together.
3. Every merge method of the spec over the specialists, through `merge_files` (the streaming
   engine), from checkpoints in DeepfakeBench layout (`backbone.*` / `head.*`).
4. AUC of every detector in three settings: in-distribution (seen families, seen generators),
   unseen generators (seen families, their second generator), unseen families.
5. Composability: R²M over the first k specialists, each step one `expand_files` call, AUC after
   each, and the merge's wall time beside the joint detector's training time.

Trained weights are cached under WORKDIR/cache/<hash of the training settings>/, so a second run
only merges and evaluates."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from r2m_ext.api import expand_files, merge_files
from r2m_ext.detect.evaluate import BUILTIN_SPEC, load_detector, score
from r2m_ext.detect.layouts import from_layout, to_layout
from r2m_ext.detect.metrics import auc_score
from r2m_ext.detect.model import DetectorViT, ViTConfig
from r2m_ext.detect.synthetic import (
    FAMILIES,
    SEEN_FAMILIES,
    UNSEEN_FAMILIES,
    fake_images,
    real_images,
)
from r2m_ext.detect.train import finetune_detector, pretrain_backbone
from r2m_ext.methods.registry import default_runnable_names, method_names
from r2m_ext.recipe import RECIPE_FILE

SETTINGS = ("in_distribution", "unseen_generator", "unseen_family")
CHECKPOINT_LAYOUT = "deepfakebench"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class BenchmarkConfig:
    model: ViTConfig = field(default_factory=ViTConfig)
    pretrain_steps: int = 600
    finetune_steps: int = 150
    # None: as many steps as all specialists together, the fair comparison.
    joint_steps: int | None = None
    finetune_lr: float = 5e-4
    batch: int = 64
    test_images: int = 200  # per class and subset
    seed: int = 0
    methods: tuple[str, ...] = field(default_factory=default_runnable_names)

    @property
    def joint_training_steps(self) -> int:
        return self.joint_steps or self.finetune_steps * len(SEEN_FAMILIES)

    def training_key(self) -> str:
        """What the trained weights depend on (not the test set, nor the merge methods)."""
        fields = asdict(self)
        del fields["test_images"], fields["methods"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


# Small enough for CI (well under two minutes on two cores), large enough to learn each artifact.
REDUCED = BenchmarkConfig(
    model=ViTConfig(image_size=32, patch_size=4, width=32, depth=2),
    pretrain_steps=300,
    finetune_steps=300,
    joint_steps=600,
    finetune_lr=1e-3,
    batch=32,
    test_images=64,
)


def subsets_of(setting: str) -> list[tuple[str, str]]:
    if setting == "in_distribution":
        return [(f, FAMILIES[f].train_generator) for f in SEEN_FAMILIES]
    if setting == "unseen_generator":
        return [(f, FAMILIES[f].unseen_generator) for f in SEEN_FAMILIES]
    return [(f, g) for f in UNSEEN_FAMILIES for g in FAMILIES[f].generators]


def _save(weights: Mapping[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".partial")
    save_file(
        dict(to_layout(weights, CHECKPOINT_LAYOUT)), str(temporary), metadata={"format": "pt"}
    )
    temporary.rename(path)
    return path


@dataclass
class Trained:
    base: Path
    specialists: dict[str, Path]  # family -> checkpoint
    joint: Path
    seconds: dict[str, float]  # training wall time per checkpoint name


def train_all(config: BenchmarkConfig, cache: Path, log: Callable[[str], None]) -> Trained:
    """θ₀, the specialists and the joint detector, trained once per training key."""
    directory = cache / config.training_key()
    times_file = directory / "training_seconds.json"
    seconds = json.loads(times_file.read_text()) if times_file.exists() else {}
    base_path = directory / "base" / WEIGHTS_FILE
    if not base_path.exists():
        log(f"pretraining θ₀ on real images ({config.pretrain_steps} steps)")
        started = time.perf_counter()
        base = pretrain_backbone(config.model, config.pretrain_steps, config.batch, config.seed)
        seconds["base"] = time.perf_counter() - started
        _save(base, base_path)
        (directory / "base" / "config.json").write_text(json.dumps(config.model.to_dict()) + "\n")
    canonical_base = None
    jobs = [(f, [(f, FAMILIES[f].train_generator)], config.finetune_steps) for f in SEEN_FAMILIES]
    jobs.append(("joint", subsets_of("in_distribution"), config.joint_training_steps))
    paths = {}
    for index, (name, forgeries, steps) in enumerate(jobs):
        path = directory / name / WEIGHTS_FILE
        paths[name] = path
        if path.exists():
            continue
        if canonical_base is None:
            canonical_base = load_detector_base(base_path)
        log(f"fine-tuning {name} detector ({steps} steps)")
        weights, took = finetune_detector(
            canonical_base,
            config.model,
            forgeries,
            steps,
            config.batch,
            config.seed + 1 + index,
            config.finetune_lr,
        )
        seconds[name] = took
        _save(weights, path)
        times_file.write_text(json.dumps(seconds, indent=1) + "\n")
    times_file.write_text(json.dumps(seconds, indent=1) + "\n")
    return Trained(
        base=base_path.parent,
        specialists={f: paths[f] for f in SEEN_FAMILIES},
        joint=paths["joint"],
        seconds=seconds,
    )


def load_detector_base(path: Path) -> dict[str, torch.Tensor]:
    return from_layout(load_file(str(path)), str(path))


class TestSets:
    """The benchmark's labelled images per (family, generator), made once per run."""

    def __init__(self, config: BenchmarkConfig):
        size, n, seed = config.model.image_size, config.test_images, config.seed
        self.images: dict[tuple[str, str], tuple[torch.Tensor, np.ndarray]] = {}
        for family in FAMILIES.values():
            for generator in family.generators:
                reals = real_images(n, size, seed, "test", family.name, generator)
                fakes = fake_images(n, size, family.name, generator, seed, "test")
                labels = np.r_[np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64)]
                self.images[(family.name, generator)] = (torch.cat([reals, fakes]), labels)

    def auc(self, model: DetectorViT, subset: tuple[str, str], batch: int = 256) -> float:
        images, labels = self.images[subset]
        scores = score(model, iter(images.split(batch)))
        return auc_score(labels, scores, "/".join(subset))

    def evaluate(self, checkpoint: Path) -> dict[str, float]:
        """AUC per subset 'family/generator' of the detector in `checkpoint`."""
        model = load_detector(BUILTIN_SPEC, checkpoint)
        return {"/".join(s): self.auc(model, s) for s in self.images}

    def write_folder(self, directory: Path) -> Path:
        """The test images as a folder tree SUBSET/real|fake/*.png, for `r2m eval`."""
        from PIL import Image

        for (family, generator), (images, labels) in self.images.items():
            for index, (image, label) in enumerate(zip(images, labels, strict=True)):
                folder = directory / f"{family}.{generator}" / ("fake" if label else "real")
                folder.mkdir(parents=True, exist_ok=True)
                pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index:05d}.png")
        return directory


def setting_means(per_subset: Mapping[str, float]) -> dict[str, float]:
    return {
        setting: float(np.mean([per_subset["/".join(s)] for s in subsets_of(setting)]))
        for setting in SETTINGS
    }


@dataclass
class BenchmarkResult:
    config: dict
    rows: dict[str, dict[str, float]]  # detector -> setting -> mean AUC
    per_subset: dict[str, dict[str, float]]  # detector -> subset -> AUC
    own_family_auc: dict[str, float]  # specialist -> AUC on its own family's seen generator
    composability: list[dict]
    training_seconds: dict[str, float]
    merge_seconds: dict[str, float]
    merged: dict[str, str]  # method -> merged checkpoint directory
    test_data: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"


def run_benchmark(
    config: BenchmarkConfig,
    workdir: str | Path,
    log: Callable[[str], None] = print,
    write_test_images: bool = False,
) -> BenchmarkResult:
    workdir = Path(workdir)
    trained = train_all(config, workdir / "cache", log)
    tests = TestSets(config)
    log("evaluating the specialists and the joint detector")
    per_subset = {f"specialist {f}": tests.evaluate(p) for f, p in trained.specialists.items()}
    per_subset["joint training"] = tests.evaluate(trained.joint)
    own = {
        f: per_subset[f"specialist {f}"][f"{f}/{FAMILIES[f].train_generator}"]
        for f in SEEN_FAMILIES
    }

    merged, merge_seconds = {}, {}
    experts = list(trained.specialists.values())
    for method in config.methods:
        out = workdir / "merged" / method
        started = time.perf_counter()
        merge_files(trained.base, experts, out, method, overwrite=True, io_threads=0)
        merge_seconds[method] = time.perf_counter() - started
        merged[method] = str(out)
        per_subset[method] = tests.evaluate(out)
        log(f"merged and evaluated {method} ({merge_seconds[method]:.2f} s merge)")

    composability = _composability(config, trained, tests, workdir, log)
    rows = {name: setting_means(values) for name, values in per_subset.items()}
    rows["specialists (mean)"] = {
        s: float(np.mean([rows[f"specialist {f}"][s] for f in SEEN_FAMILIES])) for s in SETTINGS
    }
    data = str(tests.write_folder(workdir / "test_images")) if write_test_images else None
    result = BenchmarkResult(
        config=asdict(config),
        rows=rows,
        per_subset=per_subset,
        own_family_auc=own,
        composability=composability,
        training_seconds=trained.seconds,
        merge_seconds=merge_seconds,
        merged=merged,
        test_data=data,
    )
    (workdir / "benchmark.json").write_text(result.to_json())
    return result


def _composability(config, trained: Trained, tests: TestSets, workdir: Path, log) -> list[dict]:
    """R²M over the first k specialists, k = 1..6, each step adding one with `expand_files`."""
    families = list(SEEN_FAMILIES)
    steps = []
    first = trained.specialists[families[0]]
    steps.append({"k": 1, "added": families[0], "merge_seconds": 0.0, "auc": tests.evaluate(first)})
    previous = None
    for k in range(2, len(families) + 1):
        out = workdir / "expand" / f"r2m_{k}"
        started = time.perf_counter()
        new = trained.specialists[families[k - 1]]
        if previous is None:
            experts = [trained.specialists[f] for f in families[:k]]
            merge_files(trained.base, experts, out, "r2m", overwrite=True, io_threads=0)
        else:
            expand_files(previous / RECIPE_FILE, [new], out, overwrite=True, io_threads=0)
        took = time.perf_counter() - started
        steps.append(
            {"k": k, "added": families[k - 1], "merge_seconds": took, "auc": tests.evaluate(out)}
        )
        previous = out
    for step in steps:
        seen = families[: step["k"]]
        auc = step.pop("auc")
        step["seen_so_far"] = float(
            np.mean([auc[f"{f}/{FAMILIES[f].train_generator}"] for f in seen])
        )
        step.update(setting_means(auc))
        step["joint_retrain_seconds"] = trained.seconds.get("joint")
    log("composability: R²M re-merged after adding each specialist")
    return steps


def format_table(result: BenchmarkResult) -> str:
    header = (
        f"{'detector':<28} {'in-distribution':>16} {'unseen generator':>17} {'unseen family':>14}"
    )
    lines = [header, "-" * len(header)]
    order = [f"specialist {f}" for f in SEEN_FAMILIES] + ["specialists (mean)", "joint training"]
    order += [m for m in result.rows if m in method_names()]
    for name in order:
        row = result.rows[name]
        label = "R²M" if name == "r2m" else name
        lines.append(
            f"{label:<28} {row['in_distribution']:16.4f} {row['unseen_generator']:17.4f} "
            f"{row['unseen_family']:14.4f}"
        )
        if name in ("joint training",):
            lines.append("-" * len(header))
    return "\n".join(lines)


def format_composability(result: BenchmarkResult) -> str:
    lines = [
        f"{'k':>2} {'added':<16} {'seen so far':>11} {'all seen':>9} {'unseen gen':>10} "
        f"{'unseen fam':>10} {'merge s':>8}"
    ]
    for step in result.composability:
        lines.append(
            f"{step['k']:>2} {step['added']:<16} {step['seen_so_far']:11.4f} "
            f"{step['in_distribution']:9.4f} {step['unseen_generator']:10.4f} "
            f"{step['unseen_family']:10.4f} {step['merge_seconds']:8.2f}"
        )
    joint = result.training_seconds.get("joint")
    if joint is not None:
        lines.append(f"retraining the joint detector instead takes {joint:.1f} s each time")
    return "\n".join(lines)


def save_charts(result: BenchmarkResult, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    names = [
        "specialists (mean)",
        "joint training",
        *[m for m in result.rows if m in method_names()],
    ]
    figure, axis = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(SETTINGS)
    for index, setting in enumerate(SETTINGS):
        values = [result.rows[n][setting] for n in names]
        positions = np.arange(len(names)) + (index - 1) * width
        axis.bar(positions, values, width, label=setting.replace("_", " "))
    axis.set_xticks(np.arange(len(names)), [n.replace(" (mean)", "\n(mean)") for n in names])
    axis.set_ylim(0.4, 1.0)
    axis.set_ylabel("AUC")
    axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    axis.legend(fontsize=8, loc="lower right")
    axis.set_title("Synthetic deepfake benchmark: AUC by setting")
    figure.tight_layout()
    auc_chart = directory / "auc_by_method.png"
    figure.savefig(auc_chart, dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5, 3.4))
    ks = [s["k"] for s in result.composability]
    for key, label in (
        ("seen_so_far", "families added so far"),
        ("in_distribution", "all six seen families"),
        ("unseen_family", "unseen families"),
    ):
        axis.plot(ks, [s[key] for s in result.composability], marker="o", label=label)
    axis.set_xlabel("specialists merged with R²M")
    axis.set_ylabel("AUC")
    axis.legend(fontsize=8)
    figure.tight_layout()
    expand_chart = directory / "auc_adding_families.png"
    figure.savefig(expand_chart, dpi=120)
    plt.close(figure)
    return [auc_chart, expand_chart]
