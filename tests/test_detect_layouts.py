"""Detector checkpoint layouts: conversions, head recognition, and a round trip of every layout
through the real `r2m merge`, `r2m inspect` and `r2m eval` commands."""

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

from r2m_ext.classify import TensorClass, classify
from r2m_ext.detect.evaluate import BUILTIN_SPEC, find_images, load_detector, read_image, score
from r2m_ext.detect.layouts import LAYOUTS, detect_layout, from_layout, to_layout
from r2m_ext.detect.metrics import detection_metrics
from r2m_ext.detect.model import DetectorViT, ViTConfig, vit_config_from_shapes
from r2m_ext.errors import R2MError
from r2m_ext.options import DEFAULT_EXCLUDE_TRUNCATION, DEFAULT_HEAD_PATTERNS

CONFIG = ViTConfig(image_size=8, patch_size=4, width=16, depth=2)


def _detector(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in DetectorViT(CONFIG).state_dict().items()}


# Names and shapes the real projects use (transformers' CLIP, open_clip, DeepfakeBench, timm).
KNOWN_NAMES = {
    "timm": {"blocks.1.attn.qkv.weight": (48, 16), "cls_token": (1, 1, 16), "head.bias": (2,)},
    "deepfakebench": {
        "backbone.encoder.layers.1.self_attn.k_proj.weight": (16, 16),
        "backbone.embeddings.class_embedding": (16,),
        "backbone.pre_layrnorm.weight": (16,),
        "head.weight": (2, 16),
    },
    "hf_clip": {
        "vision_model.embeddings.position_embedding.weight": (5, 16),
        "vision_model.encoder.layers.0.mlp.fc1.weight": (64, 16),
        "vision_model.post_layernorm.bias": (16,),
        "classifier.weight": (2, 16),
    },
    "open_clip": {
        "visual.transformer.resblocks.0.attn.in_proj_weight": (48, 16),
        "visual.conv1.weight": (16, 3, 4, 4),
        "visual.positional_embedding": (5, 16),
        "head.weight": (2, 16),
    },
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conversion_round_trip_and_names(layout):
    canonical = _detector(0)
    converted = to_layout(canonical, layout)
    for name, shape in KNOWN_NAMES[layout].items():
        assert tuple(converted[name].shape) == shape, name
    assert detect_layout(converted).name == layout
    back = from_layout(converted, "file.safetensors")
    assert back.keys() == canonical.keys()
    for name in canonical:
        assert torch.equal(back[name], canonical[name]), name
    heads = {
        name
        for name, value in converted.items()
        if classify(
            name, value.shape, value.dtype, DEFAULT_HEAD_PATTERNS, DEFAULT_EXCLUDE_TRUNCATION
        )
        is TensorClass.HEAD
    }
    assert heads == {LAYOUTS[layout].head_prefix + "weight", LAYOUTS[layout].head_prefix + "bias"}


def test_split_qkv_is_the_fused_matrix_in_thirds():
    canonical = _detector(0)
    hf = to_layout(canonical, "hf_clip")
    fused = canonical["blocks.0.attn.qkv.weight"]
    prefix = "vision_model.encoder.layers.0.self_attn."
    assert torch.equal(hf[prefix + "q_proj.weight"], fused[:16])
    assert torch.equal(hf[prefix + "v_proj.weight"], fused[32:])


def test_config_from_shapes():
    canonical = _detector(0)
    assert vit_config_from_shapes({k: tuple(v.shape) for k, v in canonical.items()}) == CONFIG


def test_layout_errors_name_file_and_tensor():
    hf = to_layout(_detector(0), "hf_clip")
    del hf["vision_model.encoder.layers.1.self_attn.v_proj.bias"]
    with pytest.raises(R2MError, match=r"m\.safetensors: tensor '.*layers\.1\.self_attn\.v_proj"):
        from_layout(hf, "m.safetensors")
    extra = {**to_layout(_detector(0), "timm"), "blocks.0.ls1.gamma": torch.ones(16)}
    with pytest.raises(R2MError, match="m.safetensors: tensor 'blocks.0.ls1.gamma' is not part"):
        from_layout(extra, "m.safetensors")
    with pytest.raises(R2MError, match="no known detector layout"):
        from_layout({"encoder.weight": torch.ones(2)}, "m.safetensors")


def _write_images(directory, count=6):
    """A tiny labelled folder tree of two subsets (PNG, 8x8)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for subset in ("a", "b"):
        for label in ("real", "fake"):
            folder = directory / subset / label
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return directory


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_through_merge_inspect_and_eval(tmp_path, layout):
    base = {k: v for k, v in _detector(0).items() if not k.startswith("head.")}
    experts = []
    for seed in (1, 2):
        canonical = _detector(seed)
        expert = {
            k: v if k.startswith("head.") else base[k] + 0.01 * v for k, v in canonical.items()
        }
        experts.append(expert)
    paths = []
    for name, state in [("base", base), *((f"e{i}", e) for i, e in enumerate(experts))]:
        path = tmp_path / f"{name}.safetensors"
        save_file(to_layout(state, layout), str(path))
        paths.append(path)

    shown = run_cli("inspect", paths[1])
    assert shown.returncode == 0, shown.stderr
    assert LAYOUTS[layout].description in shown.stdout
    assert "     head:     2 tensors" in shown.stdout

    for method in ("average", "r2m"):
        out = tmp_path / method
        expert_flags = [a for p in paths[1:] for a in ("--expert", p)]
        merged = run_cli(
            "merge", "--base", paths[0], *expert_flags, "--out", out, "--method", method
        )
        assert merged.returncode == 0, merged.stderr
        assert detect_layout(load_file(str(out / "model.safetensors"))).name == layout

    # Averaging is per tensor, so the merged detector is the canonical average in any layout.
    model = load_detector(BUILTIN_SPEC, tmp_path / "average")
    for name, value in model.state_dict().items():
        want = (experts[0][name] + experts[1][name]) / 2
        assert torch.allclose(value, want, atol=1e-6), name

    data = _write_images(tmp_path / "data")
    result = run_cli(
        "eval",
        "--checkpoint",
        tmp_path / "r2m",
        "--data",
        data,
        "--json",
        tmp_path / "m.json",
        "--chart",
        tmp_path / "m.png",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    assert "AUC" in result.stdout and (tmp_path / "m.png").stat().st_size > 0
    reported = json.loads((tmp_path / "m.json").read_text())
    assert set(reported) == {"a", "b", "all"}
    # The same numbers as scoring the images in this process.
    model = load_detector(BUILTIN_SPEC, tmp_path / "r2m")
    for subset in find_images(data):
        images = torch.stack([read_image(p) for p in subset.paths])
        want = detection_metrics(subset.labels, score(model, iter([images])))
        assert reported[subset.subset]["auc"] == pytest.approx(want.auc, abs=1e-9)
        assert reported[subset.subset]["eer"] == pytest.approx(want.eer, abs=1e-9)
