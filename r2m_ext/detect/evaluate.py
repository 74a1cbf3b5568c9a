"""`r2m eval`: build a detector network from a SPEC (r2m_ext.detect.SPEC_FORMS), load a
checkpoint into it (any known layout), score a labelled image set per subset, and report AUC /
AP / EER / accuracy.
"""

from __future__ import annotations

import csv
import importlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from r2m_ext.detect import BUILTIN_SPEC
from r2m_ext.detect.layouts import from_layout
from r2m_ext.detect.metrics import DetectionMetrics, detection_metrics
from r2m_ext.detect.model import DetectorViT, vit_config_from_shapes
from r2m_ext.errors import R2MError
from r2m_ext.io import Checkpoint

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABELS = {"0": 0, "1": 1, "real": 0, "fake": 1}
ALL_SUBSETS = "all"


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint(path)
    try:
        return {name: checkpoint.read(name) for name in checkpoint.metadata()}
    finally:
        checkpoint.close()


def _user_module(spec: str) -> nn.Module:
    if spec.startswith("timm:"):
        try:
            timm = importlib.import_module("timm")
        except ImportError:
            raise R2MError(f"model {spec!r} needs timm: pip install timm") from None
        model = timm.create_model(spec.removeprefix("timm:"), pretrained=False, num_classes=2)
        # timm records the input size and normalisation each architecture expects.
        config = getattr(model, "pretrained_cfg", None) or {}
        if "input_size" in config:
            model.input_size = config["input_size"][-1]
        if "mean" in config and "std" in config:
            model.mean, model.std = config["mean"], config["std"]
        return model
    if spec.startswith("transformers:"):
        try:
            transformers = importlib.import_module("transformers")
        except ImportError:
            raise R2MError(f"model {spec!r} needs transformers: pip install transformers") from None
        config = transformers.AutoConfig.for_model(spec.removeprefix("transformers:"), num_labels=2)
        model = transformers.AutoModelForImageClassification.from_config(config)
        size = getattr(config, "image_size", None) or getattr(
            getattr(config, "vision_config", None), "image_size", None
        )
        if size:
            model.input_size = size
        return model
    module_name, _, function_name = spec.partition(":")
    if not function_name:
        raise R2MError(
            f"model {spec!r}: expected {BUILTIN_SPEC}, timm:NAME, transformers:TYPE "
            "or module:function"
        )
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise R2MError(f"model {spec!r}: cannot import it ({error})") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise R2MError(f"model {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def load_detector(spec: str, checkpoint: str | Path) -> nn.Module:
    """The network SPEC with the checkpoint's weights, in eval mode. Built-in: any known layout."""
    weights = read_weights(checkpoint)
    if spec == BUILTIN_SPEC:
        canonical = from_layout(weights, str(checkpoint))
        model = DetectorViT(
            vit_config_from_shapes({k: tuple(v.shape) for k, v in canonical.items()})
        )
        weights = canonical
    else:
        model = _user_module(spec)
    result = model.load_state_dict(weights, strict=False)
    problems = [("missing", k) for k in result.missing_keys]
    problems += [("unexpected", k) for k in result.unexpected_keys]
    if problems:
        kind, name = problems[0]
        raise R2MError(
            f"{checkpoint}: tensor {name!r} is {kind} for model {spec} "
            f"({len(problems)} mismatched tensor(s))"
        )
    return model.eval()


def fake_probability(logits: torch.Tensor) -> torch.Tensor:
    if logits.ndim == 2 and logits.shape[1] == 2:
        return logits.float().softmax(dim=1)[:, 1]
    if logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1):
        return torch.sigmoid(logits.float().reshape(-1))
    raise R2MError(f"a detector returns [B, 2] or [B, 1] logits, got {list(logits.shape)}")


def _prepare(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    size = getattr(model, "input_size", None)
    if size and images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    if mean is not None and std is not None:
        images = (images - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(
            1, -1, 1, 1
        )
    return images


@torch.inference_mode()
def score(
    model: nn.Module,
    batches: Iterator[torch.Tensor],
    device: str = "cpu",
    progress: object | None = None,
) -> np.ndarray:
    """P(fake) for each image of each batch, in order."""
    model = model.to(device)
    scores = []
    for images in batches:
        output = model(_prepare(model, images).to(device))
        # transformers' models return an output object that carries the logits.
        logits = getattr(output, "logits", output)
        scores.append(fake_probability(logits).cpu())
        if progress is not None:
            progress.update(len(images))
    return torch.cat(scores).double().numpy()


@dataclass(frozen=True)
class LabelledImages:
    subset: str
    paths: tuple[Path, ...]
    labels: tuple[int, ...]


def find_images(data: str | Path) -> list[LabelledImages]:
    """Subsets of a folder tree SUBSET/real|fake/*.png|jpg (or real|fake/ directly: one subset)
    or of a CSV with columns path,label,subset (label 0/1 or real/fake; paths relative to it)."""
    data = Path(data)
    if not data.exists():
        raise R2MError(f"{data}: no such file or directory")
    subsets: dict[str, tuple[list[Path], list[int]]] = {}
    if data.is_file():
        with data.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise R2MError(f"{data}: a CSV needs a header with columns path,label[,subset]")
            for line, row in enumerate(reader, start=2):
                label = LABELS.get(str(row["label"]).strip().lower())
                if label is None:
                    raise R2MError(f"{data}:{line}: label {row['label']!r} is not 0/1/real/fake")
                paths, labels = subsets.setdefault(row.get("subset") or ALL_SUBSETS, ([], []))
                paths.append(data.parent / row["path"])
                labels.append(label)
    else:
        roots = [data] if (data / "real").is_dir() or (data / "fake").is_dir() else None
        for root in roots or sorted(p for p in data.iterdir() if p.is_dir()):
            name = ALL_SUBSETS if roots else root.name
            for label_name, label in (("real", 0), ("fake", 1)):
                folder = root / label_name
                files = (
                    sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
                    if folder.is_dir()
                    else []
                )
                paths, labels = subsets.setdefault(name, ([], []))
                paths.extend(files)
                labels.extend([label] * len(files))
    found = [LabelledImages(s, tuple(p), tuple(lab)) for s, (p, lab) in subsets.items() if p]
    if not found:
        raise R2MError(f"{data}: no images found (expected SUBSET/real|fake/*.png|jpg or a CSV)")
    return found


def read_image(path: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as error:
        raise R2MError(f"{path}: cannot read image ({error})") from None
    return torch.from_numpy(array).permute(2, 0, 1)


def _image_batches(paths: Sequence[Path], batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(paths), batch_size):
        images = [read_image(p) for p in paths[start : start + batch_size]]
        sizes = {tuple(i.shape) for i in images}
        if len(sizes) > 1:
            side = max(i.shape[-1] for i in images)
            images = [
                F.interpolate(i[None], size=(side, side), mode="bilinear", antialias=True)[0]
                for i in images
            ]
        yield torch.stack(images)


def evaluate_images(
    model: nn.Module,
    subsets: Sequence[LabelledImages],
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, DetectionMetrics]:
    """Metrics per subset, plus `all` over every image when there is more than one subset."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(s.paths) for s in subsets), unit="img", desc="scoring")
    results, all_labels, all_scores = {}, [], []
    try:
        for subset in subsets:
            scores = score(model, _image_batches(subset.paths, batch_size), device, bar)
            results[subset.subset] = detection_metrics(subset.labels, scores, subset.subset)
            all_labels.extend(subset.labels)
            all_scores.append(scores)
    finally:
        if bar is not None:
            bar.close()
    if len(subsets) > 1:
        results[ALL_SUBSETS] = detection_metrics(all_labels, np.concatenate(all_scores), "all")
    return results


def format_metrics(results: Mapping[str, DetectionMetrics]) -> str:
    width = max(len("subset"), *(len(s) for s in results))
    lines = [f"{'subset':<{width}}  {'AUC':>6}  {'AP':>6}  {'EER':>6}  {'ACC':>6}  real  fake"]
    for subset, m in results.items():
        lines.append(
            f"{subset:<{width}}  {m.auc:6.4f}  {m.ap:6.4f}  {m.eer:6.4f}  {m.accuracy:6.4f}"
            f"  {m.real:4d}  {m.fake:4d}"
        )
    return "\n".join(lines)


def save_metrics(results: Mapping[str, DetectionMetrics], json_path=None, chart_path=None):
    if json_path:
        Path(json_path).write_text(
            json.dumps({s: m.to_dict() for s, m in results.items()}, indent=2) + "\n"
        )
    if chart_path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(results)
        figure, axis = plt.subplots(figsize=(max(4, 0.6 * len(names) + 2), 3.2))
        axis.bar(names, [results[n].auc for n in names], color="tab:blue")
        axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        axis.set_ylim(0, 1)
        axis.set_ylabel("AUC")
        axis.tick_params(axis="x", rotation=45, labelsize=7)
        figure.tight_layout()
        figure.savefig(chart_path, dpi=120)
        plt.close(figure)
