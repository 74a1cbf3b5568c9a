"""Detector checkpoint layouts as users have them, and conversion to and from the built-in ViT's
canonical (timm) names.

- `timm`: `patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N.attn.qkv`, ..., `head.*`
- `deepfakebench`: `backbone.*` (a Hugging Face CLIP vision tower) + `head.*`
- `hf_clip`: `vision_model.*` + `classifier.*` (transformers' CLIPForImageClassification)
- `open_clip`: `visual.conv1`, `visual.transformer.resblocks.N.attn.in_proj_weight`, ... + `head.*`

Merging needs none of this (it is per tensor name); evaluation does, to load any of these into
the built-in network, and `r2m inspect` names the layout so a user can check the head."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from r2m_ext.errors import R2MError

Tensors = Mapping[str, torch.Tensor]


def _same(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return tensors


def _flatten_class_token(tensors):  # [1, 1, D] <-> [D]
    return [tensors[0].reshape(-1)]


def _unflatten_class_token(tensors):
    return [tensors[0].reshape(1, 1, -1)]


def _drop_batch_dim(tensors):  # [1, T, D] <-> [T, D]
    return [tensors[0][0]]


def _add_batch_dim(tensors):
    return [tensors[0].unsqueeze(0)]


def _split_qkv(tensors):  # fused [3D, ...] <-> q, k, v [D, ...]
    return list(tensors[0].chunk(3, dim=0))


def _fuse_qkv(tensors):
    return [torch.cat(tensors, dim=0)]


@dataclass(frozen=True)
class _Rule:
    canonical: str  # template with {i} (block index) and {p} (weight/bias)
    layout: tuple[str, ...]
    to_layout: Callable = _same
    from_layout: Callable = _same


_SIMPLE = (_same, _same)
_CLASS = (_flatten_class_token, _unflatten_class_token)
_POSITIONS = (_drop_batch_dim, _add_batch_dim)
_QKV = (_split_qkv, _fuse_qkv)


def _rules(table) -> tuple[_Rule, ...]:
    rules = []
    for canonical, layout, (forward, backward) in table:
        layout = (layout,) if isinstance(layout, str) else tuple(layout)
        rules.append(_Rule(canonical, layout, forward, backward))
    return tuple(rules)


_HF_VISION = _rules(
    [
        ("patch_embed.proj.weight", "embeddings.patch_embedding.weight", _SIMPLE),
        ("cls_token", "embeddings.class_embedding", _CLASS),
        ("pos_embed", "embeddings.position_embedding.weight", _POSITIONS),
        ("norm_pre.{p}", "pre_layrnorm.{p}", _SIMPLE),  # sic: transformers' spelling
        ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}", _SIMPLE),
        (
            "blocks.{i}.attn.qkv.{p}",
            [f"encoder.layers.{{i}}.self_attn.{x}_proj.{{p}}" for x in "qkv"],
            _QKV,
        ),
        ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.out_proj.{p}", _SIMPLE),
        ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}", _SIMPLE),
        ("blocks.{i}.mlp.fc1.{p}", "encoder.layers.{i}.mlp.fc1.{p}", _SIMPLE),
        ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.{i}.mlp.fc2.{p}", _SIMPLE),
        ("norm.{p}", "post_layernorm.{p}", _SIMPLE),
    ]
)

_OPEN_CLIP_VISUAL = _rules(
    [
        ("patch_embed.proj.weight", "conv1.weight", _SIMPLE),
        ("cls_token", "class_embedding", _CLASS),
        ("pos_embed", "positional_embedding", _POSITIONS),
        ("norm_pre.{p}", "ln_pre.{p}", _SIMPLE),
        ("blocks.{i}.norm1.{p}", "transformer.resblocks.{i}.ln_1.{p}", _SIMPLE),
        ("blocks.{i}.attn.qkv.{p}", "transformer.resblocks.{i}.attn.in_proj_{p}", _SIMPLE),
        ("blocks.{i}.attn.proj.{p}", "transformer.resblocks.{i}.attn.out_proj.{p}", _SIMPLE),
        ("blocks.{i}.norm2.{p}", "transformer.resblocks.{i}.ln_2.{p}", _SIMPLE),
        ("blocks.{i}.mlp.fc1.{p}", "transformer.resblocks.{i}.mlp.c_fc.{p}", _SIMPLE),
        ("blocks.{i}.mlp.fc2.{p}", "transformer.resblocks.{i}.mlp.c_proj.{p}", _SIMPLE),
        ("norm.{p}", "ln_post.{p}", _SIMPLE),
    ]
)

_TIMM = _rules(
    [
        (name, name, _SIMPLE)
        for name in (
            "patch_embed.proj.weight",
            "cls_token",
            "pos_embed",
            "norm_pre.{p}",
            *(f"blocks.{{i}}.{m}.{{p}}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2")),
            *(f"blocks.{{i}}.mlp.{m}.{{p}}" for m in ("fc1", "fc2")),
            "norm.{p}",
        )
    ]
)


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    backbone_prefix: str
    head_prefix: str
    rules: tuple[_Rule, ...]


LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout("timm", "timm VisionTransformer names, head.*", "", "head.", _TIMM),
        Layout(
            "deepfakebench",
            "DeepfakeBench: backbone.* (Hugging Face CLIP vision tower) + head.*",
            "backbone.",
            "head.",
            _HF_VISION,
        ),
        Layout(
            "hf_clip",
            "Hugging Face CLIPForImageClassification: vision_model.* + classifier.*",
            "vision_model.",
            "classifier.",
            _HF_VISION,
        ),
        Layout(
            "open_clip",
            "open_clip visual tower: visual.* + head.*",
            "visual.",
            "head.",
            _OPEN_CLIP_VISUAL,
        ),
    )
}


def detect_layout(names: Iterable[str]) -> Layout | None:
    """The layout whose backbone names these are, or None when none of the known ones."""
    names = list(names)
    for layout in LAYOUTS.values():
        if layout.backbone_prefix and any(n.startswith(layout.backbone_prefix) for n in names):
            return layout
    if any(n.startswith(("blocks.", "patch_embed.")) for n in names):
        return LAYOUTS["timm"]
    return None


@functools.cache
def _pattern(template: str) -> re.Pattern:
    text = (
        re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", "(?P<p>weight|bias)")
    )
    return re.compile(text + "$")


def to_layout(canonical: Tensors, layout: str) -> dict[str, torch.Tensor]:
    """Canonical (built-in ViT) state dict -> the same weights under `layout`'s names."""
    target = LAYOUTS[layout]
    out = {}
    for name, tensor in canonical.items():
        if name.startswith("head."):
            out[target.head_prefix + name.removeprefix("head.")] = tensor
            continue
        for rule in target.rules:
            match = _pattern(rule.canonical).match(name)
            if match:
                fields = match.groupdict()
                for template, part in zip(rule.layout, rule.to_layout([tensor]), strict=True):
                    out[target.backbone_prefix + template.format(**fields)] = part.contiguous()
                break
        else:
            raise R2MError(f"tensor {name!r} has no place in the {layout} layout")
    return out


def from_layout(tensors: Tensors, label: str) -> dict[str, torch.Tensor]:
    """Any known layout -> canonical names. Errors name `label` (the file) and the tensor."""
    layout = detect_layout(tensors)
    if layout is None:
        raise R2MError(
            f"{label}: tensor names match no known detector layout "
            f"({', '.join(LAYOUTS)}); first names: {', '.join(list(tensors)[:3])}"
        )
    canonical: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name in tensors:
        if name.startswith(layout.head_prefix):
            canonical["head." + name.removeprefix(layout.head_prefix)] = tensors[name]
            used.add(name)
    inner = {
        name.removeprefix(layout.backbone_prefix): name
        for name in tensors
        if name.startswith(layout.backbone_prefix) and name not in used
    }
    for rule in layout.rules:
        first = _pattern(rule.layout[0])
        for short, full in inner.items():
            match = first.match(short)
            if not match:
                continue
            fields = match.groupdict()
            parts = []
            for template in rule.layout:
                part_name = template.format(**fields)
                if part_name not in inner:
                    raise R2MError(
                        f"{label}: tensor {layout.backbone_prefix + part_name!r} is missing "
                        f"({layout.name} layout, needed with {full!r})"
                    )
                parts.append(tensors[inner[part_name]])
                used.add(inner[part_name])
            (value,) = rule.from_layout(parts)
            canonical[rule.canonical.format(**fields)] = value
    unknown = [name for name in tensors if name not in used]
    if unknown:
        raise R2MError(
            f"{label}: tensor {unknown[0]!r} is not part of a built-in ViT detector in the "
            f"{layout.name} layout ({len(unknown)} such tensor(s))"
        )
    return canonical
