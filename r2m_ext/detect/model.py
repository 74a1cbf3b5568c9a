"""The built-in detector network: a CLIP-style ViT backbone (pre-LN blocks, ln_pre/ln_post, no
patch bias) with a linear head on the class token, the architecture R²M's paper fine-tunes.

Module names follow timm's VisionTransformer, the canonical layout `layouts.py` converts from and
to. Its sizes are read back from a checkpoint's shapes (`vit_config_from_shapes`), so any
checkpoint this module wrote, in any layout, rebuilds without a config file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

# Heads are not visible in tensor shapes; the built-in ViT fixes their width instead.
HEAD_DIM = 16


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 32
    patch_size: int = 4
    width: int = 64
    depth: int = 4
    num_classes: int = 2

    @property
    def heads(self) -> int:
        return max(1, self.width // HEAD_DIM)

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def to_dict(self) -> dict:
        return asdict(self)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(width, 3 * width)
        self.attn.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(width, 4 * width)
        self.mlp.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.attn.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.attn.proj(attended.transpose(1, 2).reshape(batch, tokens, width))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class DetectorViT(nn.Module):
    """Images [B, 3, S, S] in [0, 1] -> logits [B, num_classes] (class 1 = fake)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.input_size = config.image_size
        width = config.width
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(
            3, width, config.patch_size, stride=config.patch_size, bias=False
        )
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, config.tokens, width))
        self.norm_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(_Block(width, config.heads) for _ in range(config.depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, config.num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        # Centred inputs: the procedural images live in [0, 1].
        patches = self.patch_embed.proj(images - 0.5).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        x = self.norm_pre(torch.cat([cls, patches], dim=1) + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def vit_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> ViTConfig:
    """Sizes of a built-in ViT from its canonical (timm-layout) tensor shapes."""
    width, _, patch, _ = shapes["patch_embed.proj.weight"]
    tokens = shapes["pos_embed"][1]
    side = round((tokens - 1) ** 0.5)
    depth = 1 + max(int(name.split(".")[1]) for name in shapes if name.startswith("blocks."))
    num_classes = shapes["head.weight"][0] if "head.weight" in shapes else 2
    return ViTConfig(
        image_size=side * patch,
        patch_size=patch,
        width=width,
        depth=depth,
        num_classes=num_classes,
    )
