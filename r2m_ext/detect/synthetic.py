"""Procedural images for the built-in deepfake benchmark: face-like "real" images and eight
forgery families, each with two generators, each leaving its own kind of artifact.

A real image is a shaded, textured skin-toned ellipse with eyes and a mouth on a smooth
background, plus sensor noise, quantised to 8 bits like a photo. A forgery starts from a real
image (the same distribution of content) and applies its family's manipulation, so a detector can
only tell them apart by the artifact. Everything is a function of (seed, purpose), on the CPU, in
float32, so a benchmark is the same on every machine."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

Images = torch.Tensor  # [n, 3, S, S], float32 in [0, 1]
SENSOR_NOISE = 0.01


@dataclass(frozen=True)
class Faces:
    images: Images  # before sensor noise and quantisation
    cx: torch.Tensor  # [n, 1, 1] face centre and radii in [-1, 1] image coordinates
    cy: torch.Tensor
    rx: torch.Tensor
    ry: torch.Tensor

    @property
    def size(self) -> int:
        return self.images.shape[-1]

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        axis = torch.linspace(-1, 1, self.size)
        yy, xx = torch.meshgrid(axis, axis, indexing="ij")
        return yy, xx

    def ellipse(self, cx, cy, rx, ry, sharpness: float) -> torch.Tensor:
        yy, xx = self.grid()
        distance = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
        return torch.sigmoid((1 - distance) * sharpness).unsqueeze(1)

    def face_mask(self, scale: float = 1.0, sharpness: float = 12.0) -> torch.Tensor:
        return self.ellipse(self.cx, self.cy, scale * self.rx, scale * self.ry, sharpness)


def stream(seed: int, *purpose: object) -> torch.Generator:
    """A generator seeded from (seed, purpose): independent streams, stable across runs."""
    digest = hashlib.sha256(repr((seed, *purpose)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return (low + (high - low) * torch.rand(n, 1, 1, generator=generator)).float()


def _smooth_noise(n: int, channels: int, size: int, cells: int, generator) -> torch.Tensor:
    coarse = torch.randn(n, channels, cells, cells, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def _blur(images: Images, radius: int) -> Images:
    """Separable Gaussian blur (sigma = radius / 2) with edge padding."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-2 * (offsets / radius) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    return F.conv2d(F.conv2d(padded, horizontal, groups=channels), vertical, groups=channels)


def faces(n: int, size: int, generator: torch.Generator) -> Faces:
    axis = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    cx, cy = 0.15 * _uniform(n, -1, 1, generator), 0.1 * _uniform(n, -1, 1, generator)
    rx, ry = _uniform(n, 0.45, 0.6, generator), _uniform(n, 0.55, 0.75, generator)
    light_x, light_y = _uniform(n, -1, 1, generator), _uniform(n, -1, 1, generator)

    background_colour = torch.rand(n, 3, 1, 1, generator=generator)
    gradient = (light_x * xx + light_y * yy).unsqueeze(1)
    background = background_colour * (1 + 0.3 * gradient) + 0.12 * _smooth_noise(
        n, 3, size, 4, generator
    )
    red = _uniform(n, 0.45, 0.95, generator)
    skin = torch.stack(
        [red, red * _uniform(n, 0.7, 0.85, generator), red * _uniform(n, 0.55, 0.75, generator)],
        dim=1,
    )
    shading = 1 + 0.25 * (light_x * (xx - cx) + light_y * (yy - cy)).unsqueeze(1)
    texture = 1 + 0.08 * _smooth_noise(n, 1, size, max(2, size // 4), generator)
    texture = texture + 0.04 * _smooth_noise(n, 1, size, max(2, size // 2), generator)
    face = skin * shading * texture

    geometry = Faces(background, cx, cy, rx, ry)
    images = background + geometry.face_mask() * (face - background)
    eye_colour = _uniform(n, 0.05, 0.3, generator).unsqueeze(1)
    for side in (-1, 1):
        eye = geometry.ellipse(cx + side * 0.38 * rx, cy - 0.2 * ry, 0.16 * rx, 0.09 * ry, 8)
        images = images + eye * (eye_colour - images)
    lips = torch.tensor([0.6, 0.2, 0.2]).view(1, 3, 1, 1) * _uniform(
        n, 0.6, 1, generator
    ).unsqueeze(1)
    mouth = geometry.ellipse(cx, cy + 0.45 * ry, 0.35 * rx, 0.08 * ry, 8)
    images = images + mouth * (lips - images)
    return Faces(images, cx, cy, rx, ry)


def finish(images: Images, generator: torch.Generator | None, noise: float = SENSOR_NOISE):
    """Sensor noise (where the image passed through a camera) and 8-bit quantisation."""
    if generator is not None and noise > 0:
        images = images + noise * torch.randn(images.shape, generator=generator)
    return (images.clamp(0, 1) * 255).round() / 255


# ---- forgery generators: (faces, photo, generator) -> forged image before quantisation ----------
# `photo` is the real image with sensor noise; each generator removes, keeps or adds to it as its
# manipulation would.


def _hard_blend(faces: Faces, photo: Images, g) -> Images:
    donor = photo.roll(1, dims=0)
    mask = (faces.face_mask(0.75, sharpness=60) > 0.5).float()
    return photo + mask * (donor - photo)


def _feathered_blend(faces: Faces, photo: Images, g) -> Images:
    mask = faces.face_mask(0.8, sharpness=4)
    donor = _blur(photo.roll(1, dims=0), 1)
    weight = mask.sum(dim=(2, 3), keepdim=True)
    donor_mean = (donor * mask).sum(dim=(2, 3), keepdim=True) / weight
    target_mean = (photo * mask).sum(dim=(2, 3), keepdim=True) / weight
    return photo + mask * (donor - donor_mean + target_mean - photo)


def _warp(photo: Images, dx: torch.Tensor, dy: torch.Tensor) -> Images:
    axis = torch.linspace(-1, 1, photo.shape[-1])
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    grid = torch.stack([xx + dx, yy + dy], dim=-1)
    return F.grid_sample(photo, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _wave_warp(faces: Faces, photo: Images, g) -> Images:
    yy, xx = faces.grid()
    n = photo.shape[0]
    amplitude = 1.5 * 2 / faces.size  # 1.5 pixels
    phase_x, phase_y = _uniform(n, 0, 2 * math.pi, g), _uniform(n, 0, 2 * math.pi, g)
    mask = faces.face_mask(1.0, sharpness=6)[:, 0]
    dx = mask * amplitude * torch.sin(3 * math.pi * yy + phase_x)
    dy = mask * amplitude * torch.sin(3 * math.pi * xx + phase_y)
    return _warp(photo, dx, dy)


def _mouth_bulge(faces: Faces, photo: Images, g) -> Images:
    yy, xx = faces.grid()
    mx, my = faces.cx, faces.cy + 0.45 * faces.ry
    radius2 = (xx - mx) ** 2 + (yy - my) ** 2
    pull = 0.45 * torch.exp(-radius2 / (0.3 * faces.rx) ** 2)
    return _warp(photo, -pull * (xx - mx), -pull * (yy - my))


def _checkerboard(faces: Faces, photo: Images, g) -> Images:
    small = F.avg_pool2d(faces.images, 2)
    upsampled = F.interpolate(small, scale_factor=2, mode="nearest")
    yy, xx = torch.meshgrid(*(torch.arange(faces.size),) * 2, indexing="ij")
    checker = ((xx + yy) % 2 * 2 - 1).float()
    return upsampled + 0.03 * checker * upsampled.mean(dim=1, keepdim=True)


def _spectral_peak(faces: Faces, photo: Images, g) -> Images:
    small = F.avg_pool2d(faces.images, 2)
    upsampled = F.interpolate(small, scale_factor=2, mode="bilinear", align_corners=False)
    yy, xx = torch.meshgrid(*(torch.arange(faces.size).float(),) * 2, indexing="ij")
    grid = torch.cos(math.pi * xx / 2) * torch.cos(math.pi * yy / 2)  # period 4 px
    return upsampled + 0.025 * grid


def _eye_band(faces: Faces) -> torch.Tensor:
    yy, xx = faces.grid()
    inside = (yy - (faces.cy - 0.2 * faces.ry)).abs() < 0.15 * faces.ry
    inside = inside & ((xx - faces.cx).abs() < 0.8 * faces.rx)
    return inside.float().unsqueeze(1)


def _recolour(faces: Faces, photo: Images, g) -> Images:
    tint = torch.tensor([1.15, 0.9, 0.95]).view(1, 3, 1, 1)
    return photo + _eye_band(faces) * (photo * tint - photo)


def _smooth_skin(faces: Faces, photo: Images, g) -> Images:
    mask = faces.face_mask(0.7, sharpness=8)
    return photo + mask * (_blur(photo, 2) - photo)


def _denoised_residue(faces: Faces, photo: Images, g) -> Images:
    n, _, size, _ = photo.shape
    grey_noise = torch.randn(n, 1, size, size, generator=g)
    return _blur(faces.images, 1) + 0.02 * grey_noise


def _correlated_residue(faces: Faces, photo: Images, g) -> Images:
    noise = torch.randn(photo.shape, generator=g)
    correlated = F.avg_pool2d(F.pad(noise, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return _blur(faces.images, 1) + 0.05 * correlated


def _dct_matrix(size: int) -> torch.Tensor:
    k = torch.arange(size).float()
    matrix = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * size))
    matrix[0] /= math.sqrt(2)
    return matrix * math.sqrt(2 / size)


def _jpeg_like(images: Images, step: float, offset: int, block: int = 8) -> Images:
    """Quantises block DCT coefficients (step grows with frequency) on a grid shifted by offset."""
    shifted = images.roll((-offset, -offset), dims=(2, 3))
    n, channels, size, _ = shifted.shape
    block = min(block, size)
    cells = size // block
    dct = _dct_matrix(block)
    blocks = shifted.reshape(n, channels, cells, block, cells, block).transpose(3, 4)
    coefficients = dct @ blocks @ dct.T
    frequency = torch.arange(block).float()
    steps = step * (1 + frequency[:, None] + frequency[None, :])
    quantised = torch.round(coefficients / steps) * steps
    restored = (dct.T @ quantised @ dct).transpose(3, 4).reshape(n, channels, size, size)
    return restored.roll((offset, offset), dims=(2, 3))


def _jpeg_aligned(faces: Faces, photo: Images, g) -> Images:
    return _jpeg_like(photo, 0.03, 0)


def _jpeg_shifted(faces: Faces, photo: Images, g) -> Images:
    return _jpeg_like(_jpeg_like(photo, 0.02, 0), 0.04, 4)


def _face_gradient(faces: Faces, photo: Images, g) -> Images:
    yy, xx = faces.grid()
    n = photo.shape[0]
    angle = _uniform(n, 0, 2 * math.pi, g)
    ramp = (torch.cos(angle) * (xx - faces.cx) + torch.sin(angle) * (yy - faces.cy)) / faces.rx
    return photo * (1 + faces.face_mask() * 0.35 * ramp.unsqueeze(1))


def _spotlight(faces: Faces, photo: Images, g) -> Images:
    n = photo.shape[0]
    sx = faces.cx + faces.rx * _uniform(n, -0.5, 0.5, g)
    sy = faces.cy + faces.ry * _uniform(n, -0.5, 0.5, g)
    spot = faces.ellipse(sx, sy, 0.3 * faces.rx, 0.3 * faces.ry, 3)
    warm = torch.tensor([0.25, 0.15, 0.0]).view(1, 3, 1, 1)
    return photo + spot * warm


def _square(faces: Faces, g, side: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    yy, xx = faces.grid()
    n = faces.images.shape[0]
    x0 = faces.cx + faces.rx * _uniform(n, -0.4, 0.4, g)
    y0 = faces.cy + faces.ry * _uniform(n, -0.4, 0.4, g)
    mask = ((xx - x0).abs() < side) & ((yy - y0).abs() < side)
    return mask.float().unsqueeze(1), x0, y0


def _smooth_fill(faces: Faces, photo: Images, g) -> Images:
    mask, _, _ = _square(faces, g, 0.25)
    return photo + mask * (_blur(photo, 4) - photo)


def _copy_move(faces: Faces, photo: Images, g) -> Images:
    mask, _, _ = _square(faces, g, 0.25)
    shift = max(1, faces.size // 4)
    moved = photo.roll((shift, -shift), dims=(2, 3))
    return photo + mask * (moved - photo)


ForgeryFn = Callable[[Faces, Images, torch.Generator], Images]


@dataclass(frozen=True)
class Family:
    name: str
    artifact: str
    generators: dict[str, ForgeryFn]  # the first trains specialists, the second is unseen

    @property
    def train_generator(self) -> str:
        return next(iter(self.generators))

    @property
    def unseen_generator(self) -> str:
        return list(self.generators)[1]


FAMILIES = {
    family.name: family
    for family in (
        Family(
            "face_swap",
            "blending seams",
            {"hard_blend": _hard_blend, "feathered_blend": _feathered_blend},
        ),
        Family("reenactment", "warping", {"wave_warp": _wave_warp, "mouth_bulge": _mouth_bulge}),
        Family(
            "face_synthesis",
            "GAN upsampling: checkerboard, spectral peaks",
            {"checkerboard": _checkerboard, "spectral_peak": _spectral_peak},
        ),
        Family(
            "attribute_edit",
            "local edits",
            {"recolour": _recolour, "smooth_skin": _smooth_skin},
        ),
        Family(
            "diffusion",
            "denoising residue instead of sensor noise",
            {"denoised_residue": _denoised_residue, "correlated_residue": _correlated_residue},
        ),
        Family(
            "recompression",
            "JPEG block grid",
            {"jpeg_aligned": _jpeg_aligned, "jpeg_shifted": _jpeg_shifted},
        ),
        Family(
            "relighting",
            "illumination inconsistent with the scene",
            {"face_gradient": _face_gradient, "spotlight": _spotlight},
        ),
        Family(
            "inpainting",
            "filled or copied regions",
            {"smooth_fill": _smooth_fill, "copy_move": _copy_move},
        ),
    )
}
# Specialists are fine-tuned on the first six; the last two are never seen in training.
SEEN_FAMILIES = tuple(FAMILIES)[:6]
UNSEEN_FAMILIES = tuple(FAMILIES)[6:]


def real_images(n: int, size: int, seed: int, *purpose: object) -> Images:
    generator = stream(seed, "real", *purpose)
    return finish(faces(n, size, generator).images, generator)


def fake_images(n: int, size: int, family: str, generator_name: str, seed: int, *purpose) -> Images:
    generator = stream(seed, "fake", family, generator_name, *purpose)
    source = faces(n, size, generator)
    photo = finish(source.images, generator)
    forged = FAMILIES[family].generators[generator_name](source, photo, generator)
    return finish(forged, None)
