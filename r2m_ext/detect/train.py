"""Training for the built-in benchmark: a self-supervised backbone θ₀ on real images only, then
detectors fine-tuned from it (one specialist per forgery family, or one joint detector).

Every batch is drawn fresh from the procedural generators, seeded by (seed, purpose, step), and
the weights are initialised from a seeded generator, so a run is reproducible on one machine."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from r2m_ext.detect.model import DetectorViT, ViTConfig
from r2m_ext.detect.synthetic import fake_images, real_images, stream

ROTATIONS = 4  # the pretext task: which of 0/90/180/270 degrees an image was turned by


def _optimizer(model: nn.Module, lr: float, steps: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, 1 - step / steps)
    )
    return optimizer, schedule


def _seeded_model(config: ViTConfig, seed: int) -> DetectorViT:
    # Parameters come from this run's seed, whatever torch's global generator has done before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DetectorViT(config)


def pretrain_backbone(
    config: ViTConfig, steps: int, batch: int, seed: int, lr: float = 1e-3
) -> dict[str, torch.Tensor]:
    """θ₀: the ViT trained to predict image rotation on real images. Returned without a head
    (the pretext head has nothing to do with detection)."""
    model = _seeded_model(ViTConfig(**{**config.to_dict(), "num_classes": ROTATIONS}), seed)
    optimizer, schedule = _optimizer(model, lr, steps)
    model.train()
    for step in range(steps):
        images = real_images(batch, config.image_size, seed, "pretrain", step)
        turns = torch.randint(ROTATIONS, (batch,), generator=stream(seed, "turns", step))
        rotated = torch.stack(
            [
                torch.rot90(image, int(k), dims=(1, 2))
                for image, k in zip(images, turns, strict=True)
            ]
        )
        loss = nn.functional.cross_entropy(model(rotated), turns)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return {
        name: value.detach().clone()
        for name, value in model.state_dict().items()
        if not name.startswith("head.")
    }


def detection_batch(
    forgeries: Sequence[tuple[str, str]], batch: int, size: int, seed: int, *purpose
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half real, half fake, the fakes spread evenly over `forgeries` (family, generator)."""
    reals = real_images(batch // 2, size, seed, *purpose)
    per = [(batch - batch // 2) // len(forgeries)] * len(forgeries)
    for index in range((batch - batch // 2) - sum(per)):
        per[index] += 1
    fakes = [
        fake_images(count, size, family, generator, seed, *purpose)
        for (family, generator), count in zip(forgeries, per, strict=True)
        if count
    ]
    images = torch.cat([reals, *fakes])
    labels = torch.cat([torch.zeros(len(reals)), torch.ones(len(images) - len(reals))]).long()
    return images, labels


def finetune_detector(
    base: dict[str, torch.Tensor],
    config: ViTConfig,
    forgeries: Sequence[tuple[str, str]],
    steps: int,
    batch: int,
    seed: int,
    lr: float = 3e-4,
) -> tuple[dict[str, torch.Tensor], float]:
    """A detector fine-tuned from θ₀ (every weight, plus a new 2-logit head) on real images vs
    `forgeries`. Returns its weights and the seconds training took."""
    started = time.perf_counter()
    model = _seeded_model(config, seed)
    model.load_state_dict(base, strict=False)  # the head keeps its seeded initialisation
    optimizer, schedule = _optimizer(model, lr, steps)
    model.train()
    tag = "+".join(f"{f}/{g}" for f, g in forgeries)
    for step in range(steps):
        images, labels = detection_batch(forgeries, batch, config.image_size, seed, tag, step)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return weights, time.perf_counter() - started
