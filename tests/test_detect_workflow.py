"""`r2m eval` inputs and model specs, `r2m expand`, and the procedural forgery generators."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import load_file, save_file

from r2m_ext.api import expand_files, merge_files
from r2m_ext.detect.evaluate import fake_probability, find_images
from r2m_ext.detect.layouts import to_layout
from r2m_ext.detect.model import DetectorViT, ViTConfig
from r2m_ext.detect.synthetic import (
    FAMILIES,
    SEEN_FAMILIES,
    UNSEEN_FAMILIES,
    fake_images,
    real_images,
)
from r2m_ext.errors import R2MError

CONFIG = ViTConfig(image_size=8, patch_size=4, width=16, depth=1)


def _state(seed):
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in DetectorViT(CONFIG).state_dict().items()}


def _png(path, value):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def test_csv_and_folder_inputs(tmp_path):
    for index in range(3):
        _png(tmp_path / "imgs" / f"r{index}.png", 10 * index)
        _png(tmp_path / "imgs" / f"f{index}.png", 200 + index)
    lines = ["path,label,subset"]
    lines += [f"imgs/r{i}.png,real,s{i % 2}" for i in range(3)]
    lines += [f"imgs/f{i}.png,1,s{i % 2}" for i in range(3)]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    subsets = {s.subset: s for s in find_images(tmp_path / "data.csv")}
    assert set(subsets) == {"s0", "s1"}
    assert subsets["s0"].labels == (0, 0, 1, 1)
    assert subsets["s0"].paths[0] == tmp_path / "imgs" / "r0.png"

    _png(tmp_path / "flat" / "real" / "a.jpg", 5)
    _png(tmp_path / "flat" / "fake" / "b.png", 250)
    (flat,) = find_images(tmp_path / "flat")
    assert (flat.subset, flat.labels) == ("all", (0, 1))

    (tmp_path / "bad.csv").write_text("path,label\nimgs/r0.png,maybe\n")
    with pytest.raises(R2MError, match=r"bad.csv:2: label 'maybe'"):
        find_images(tmp_path / "bad.csv")
    with pytest.raises(R2MError, match="no images found"):
        find_images(tmp_path / "imgs")


def test_fake_probability_two_and_one_logit():
    logits = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(
        fake_probability(logits), torch.tensor([0.5, 1 / (1 + float(np.exp(-2)))])
    )
    assert torch.allclose(
        fake_probability(torch.tensor([[0.0], [2.0]])), torch.sigmoid(torch.tensor([0.0, 2.0]))
    )
    with pytest.raises(R2MError, match=r"got \[2, 3\]"):
        fake_probability(torch.zeros(2, 3))


USER_MODULE = '''
import torch
from torch import nn


class Brightness(nn.Module):
    """One logit: how bright the image is, around mid-grey."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, images):
        return (self.scale * (images.mean(dim=(1, 2, 3)) - 0.5)).unsqueeze(1)


def build():
    return Brightness()
'''


def test_user_model_spec_and_errors(tmp_path):
    (tmp_path / "my_detectors.py").write_text(USER_MODULE)
    save_file({"scale": torch.tensor([4.0])}, str(tmp_path / "bright.safetensors"))
    for index in range(3):
        _png(tmp_path / "data" / "real" / f"{index}.png", 20 + index)
        _png(tmp_path / "data" / "fake" / f"{index}.png", 220 + index)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"}

    def r2m(*args):
        return subprocess.run(
            [sys.executable, "-m", "r2m_ext", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    ok = r2m(
        "eval",
        "--model",
        "my_detectors:build",
        "--checkpoint",
        tmp_path / "bright.safetensors",
        "--data",
        tmp_path / "data",
    )
    assert ok.returncode == 0, ok.stderr
    # Brighter is fake and every fake is brighter: perfect separation.
    assert "all     1.0000  1.0000  0.0000  1.0000     3     3" in ok.stdout

    save_file({"other": torch.ones(1)}, str(tmp_path / "wrong.safetensors"))
    wrong = r2m(
        "eval",
        "--model",
        "my_detectors:build",
        "--checkpoint",
        tmp_path / "wrong.safetensors",
        "--data",
        tmp_path / "data",
    )
    assert wrong.returncode == 1
    assert (
        "wrong.safetensors: tensor 'scale' is missing for model my_detectors:build" in wrong.stderr
    )
    for spec, message in (
        ("nowhere:build", "cannot import it"),
        ("timm:vit_tiny_patch16_224", "needs timm" if _missing("timm") else "mismatched"),
        ("justaname", "expected r2m-vit"),
    ):
        result = r2m(
            "eval",
            "--model",
            spec,
            "--checkpoint",
            tmp_path / "bright.safetensors",
            "--data",
            tmp_path / "data",
        )
        assert result.returncode == 1 and message in result.stderr, result.stderr


def _missing(module):
    try:
        __import__(module)
    except ImportError:
        return True
    return False


def test_expand_equals_merging_all_at_once(tmp_path):
    base = {k: v for k, v in _state(0).items() if not k.startswith("head.")}
    paths = []
    for seed in range(1, 4):
        expert = {
            k: (v if k.startswith("head.") else base[k] + 0.01 * v) for k, v in _state(seed).items()
        }
        paths.append(tmp_path / f"e{seed}.safetensors")
        save_file(to_layout(expert, "deepfakebench"), str(paths[-1]))
    save_file(to_layout(base, "deepfakebench"), str(tmp_path / "base.safetensors"))
    merge_files(tmp_path / "base.safetensors", paths[:2], tmp_path / "two", "r2m", alpha=0.5)
    everything = merge_files(
        tmp_path / "base.safetensors", paths, tmp_path / "all", "r2m", alpha=0.5
    )

    result = run_cli(
        "expand",
        tmp_path / "two" / "r2m_recipe.yaml",
        "--expert",
        paths[2],
        "--out",
        tmp_path / "three",
    )
    assert result.returncode == 0, result.stderr
    got = load_file(str(tmp_path / "three" / "model.safetensors"))
    want = load_file(str(everything / "model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    recipe = (tmp_path / "three" / "r2m_recipe.yaml").read_text()
    assert str(paths[2]) in recipe and "alpha: 0.5" in recipe

    # An option given to expand_files overrides the recipe's.
    overridden = expand_files(
        tmp_path / "two" / "r2m_recipe.yaml", [paths[2]], tmp_path / "alpha", alpha=0.9
    )
    assert "alpha: 0.9" in (overridden / "r2m_recipe.yaml").read_text()

    with pytest.raises(R2MError, match="already an expert"):
        expand_files(tmp_path / "two" / "r2m_recipe.yaml", [paths[0]], tmp_path / "again")
    # Into the recipe's own output: refused unless --overwrite, then replaced.
    refused = run_cli("expand", tmp_path / "two" / "r2m_recipe.yaml", "--expert", paths[2])
    assert refused.returncode == 1 and "--overwrite" in refused.stderr
    replaced = run_cli(
        "expand", tmp_path / "two" / "r2m_recipe.yaml", "--expert", paths[2], "--overwrite"
    )
    assert replaced.returncode == 0, replaced.stderr
    assert torch.equal(
        load_file(str(tmp_path / "two" / "model.safetensors"))["head.weight"], want["head.weight"]
    )


def test_generators_are_deterministic_and_distinct():
    assert len(SEEN_FAMILIES) >= 6 and len(UNSEEN_FAMILIES) >= 1
    assert all(len(f.generators) >= 2 for f in FAMILIES.values())
    reals = real_images(4, 16, 7, "t")
    assert torch.equal(reals, real_images(4, 16, 7, "t"))
    assert not torch.equal(reals, real_images(4, 16, 8, "t"))
    # 8-bit images in [0, 1].
    assert torch.equal(reals, (reals * 255).round() / 255) and 0 <= reals.min() <= reals.max() <= 1
    for family in FAMILIES.values():
        outputs = []
        for generator in family.generators:
            fakes = fake_images(4, 16, family.name, generator, 7, "t")
            assert torch.equal(fakes, fake_images(4, 16, family.name, generator, 7, "t"))
            assert fakes.shape == (4, 3, 16, 16) and torch.isfinite(fakes).all()
            outputs.append(fakes)
        # The two generators of a family leave different artifacts on the same sources.
        assert (outputs[0] - outputs[1]).abs().mean() > 1e-3, family.name


def test_eval_and_expand_errors_name_the_file(tmp_path):
    canonical = _state(0)
    save_file(to_layout(canonical, "timm"), str(tmp_path / "det.safetensors"))
    _png(tmp_path / "data" / "real" / "a.png", 10)
    (tmp_path / "data" / "fake").mkdir(parents=True)
    (tmp_path / "data" / "fake" / "b.png").write_bytes(b"not a png")
    broken = run_cli(
        "eval", "--checkpoint", tmp_path / "det.safetensors", "--data", tmp_path / "data"
    )
    assert broken.returncode == 1
    assert "b.png: cannot read image" in broken.stderr and "Traceback" not in broken.stderr

    missing = run_cli("expand", tmp_path / "nowhere.yaml", "--expert", tmp_path / "det.safetensors")
    assert missing.returncode == 1 and "nowhere.yaml: cannot read recipe" in missing.stderr
