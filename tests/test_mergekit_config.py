"""mergekit YAML configs through `r2m merge --config` and `r2m_ext.merge_config`, checked against
the real mergekit (0.1.5, its own Python entry `run_merge`, and once `mergekit-yaml`) on tiny
sharded Llama checkpoints built with transformers (no download)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import r2m_ext
from r2m_ext.errors import R2MError
from r2m_ext.methods.mergekit_semantics import evaluate_setting, layer_position
from tests.checkpoints import tensors_in
from tests.conftest import relative_error, run_cli

mergekit = pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.config import evaluate_setting as mergekit_evaluate_setting  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions as MergekitOptions  # noqa: E402

N_LAYERS = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """base, m1, m2, m3: tiny Llama models (sharded safetensors, config.json); mi = base +
    0.05 * noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base", max_shard_size="20KB")
    for i in (1, 2, 3):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            expert = {
                name: value + 0.05 * torch.randn(value.shape, generator=generator)
                for name, value in base.state_dict().items()
            }
        model = LlamaForCausalLM(config)
        model.load_state_dict(expert)
        model.save_pretrained(root / f"m{i}", max_shard_size="20KB")
    return root


def write_config(tmp_path: Path, models: Path, text: str) -> Path:
    """The config with MODELS/ replaced by the models' directory (absolute: mergekit resolves
    paths against the current directory)."""
    path = tmp_path / "config.yaml"
    path.write_text(text.replace("MODELS/", f"{models}/"))
    return path


def run_mergekit(config: Path, out: Path) -> dict[str, torch.Tensor]:
    document = MergeConfiguration.model_validate(yaml.safe_load(config.read_text()))
    options = MergekitOptions(write_model_card=False, copy_tokenizer=False, quiet=True)
    run_merge(document, str(out), options=options)
    return tensors_in(out)


def assert_same_merge(ours: dict, theirs: dict, tolerance: float = 1e-6) -> None:
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        assert relative_error(ours[name], theirs[name]) <= tolerance, name


# Every supported method, with per-model weights and densities, a shared parameter, a gradient
# (interpolated over the 3 layers) and a tensor-name filter list among them.
DETERMINISTIC_CONFIGS = {
    "linear": """
merge_method: linear
models:
  - {model: MODELS/m1, parameters: {weight: 0.5}}
  - {model: MODELS/m2, parameters: {weight: [0.1, 0.9]}}
  - {model: MODELS/m3, parameters: {weight: 0.3}}
dtype: float32
""",
    "linear_with_base": """
merge_method: linear
base_model: MODELS/base
models:
  - {model: MODELS/m1, parameters: {weight: 0.5}}
  - {model: MODELS/m2, parameters: {weight: 0.2}}
parameters: {weight: 1.0, normalize: false}
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: MODELS/base
models:
  - {model: MODELS/m1, parameters: {weight: 0.5}}
  - model: MODELS/m2
    parameters: {weight: [{filter: self_attn, value: 1.0}, {value: -0.3}]}
  - {model: MODELS/m3, parameters: {weight: 0.3}}
parameters: {lambda: 0.8, normalize: true}
dtype: float32
""",
    "ties": """
merge_method: ties
base_model: MODELS/base
models:
  - {model: MODELS/m1, parameters: {weight: 0.5, density: 0.4}}
  - model: MODELS/m2
    parameters:
      weight: [0.2, 0.8]
      density: [{filter: mlp, value: 0.7}, {value: 0.3}]
  - {model: MODELS/m3, parameters: {weight: 0.3, density: 0.5}}
parameters: {lambda: 1.2}
dtype: float32
""",
    "ties_rescaled_bf16_out": """
merge_method: ties
base_model: MODELS/base
models:
  - {model: MODELS/base}
  - {model: MODELS/m1, parameters: {weight: 1.0, density: 0.2}}
  - {model: MODELS/m2, parameters: {weight: 1.0, density: 0.9}}
parameters: {rescale: true, int8_mask: true, normalize: false}
dtype: float32
out_dtype: bfloat16
""",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: MODELS/base
models:
  - {model: MODELS/m1, parameters: {weight: 0.5, density: 0.6, gamma: 0.05}}
  - {model: MODELS/m2, parameters: {weight: 0.7, density: 0.8}}
dtype: float32
""",
    "breadcrumbs_ties": """
merge_method: breadcrumbs_ties
base_model: MODELS/base
models:
  - {model: MODELS/m1, parameters: {weight: 0.5, density: 0.6, gamma: 0.05}}
  - {model: MODELS/m2, parameters: {weight: 0.7, density: 0.8}}
  - {model: MODELS/m3, parameters: {weight: 0.4, density: 0.5}}
parameters: {normalize: true, rescale: true}
dtype: float32
""",
    # density 1: DARE's mask keeps everything, so the rest of dare_ties is compared exactly.
    "dare_ties_density_1": """
merge_method: dare_ties
base_model: MODELS/base
models:
  - {model: MODELS/m1, parameters: {weight: 0.6, density: 1.0}}
  - {model: MODELS/m2, parameters: {weight: 0.4, density: 1.0}}
  - {model: MODELS/m3, parameters: {weight: 0.4, density: 1.0}}
parameters: {normalize: true}
dtype: float32
""",
}


@pytest.mark.parametrize("name", sorted(DETERMINISTIC_CONFIGS))
def test_config_merges_to_mergekits_tensors(models, tmp_path, name):
    config = write_config(tmp_path, models, DETERMINISTIC_CONFIGS[name])
    theirs = run_mergekit(config, tmp_path / "mergekit")
    out = r2m_ext.merge_config(config, tmp_path / "r2m")
    assert_same_merge(tensors_in(out), theirs)
    # Under a budget that streams tensor by tensor: the same merge.
    small = r2m_ext.merge_config(config, tmp_path / "r2m_small", max_memory="300KB")
    assert_same_merge(tensors_in(small), tensors_in(out), tolerance=0.0)


def test_fused_ties_gives_the_torch_paths_bytes_with_ties_at_every_cut(models, tmp_path):
    """TIES runs as two histogram passes and one fused kernel (ops.ties_merge_weighted) where
    the native kernels are built; the pure-torch path (R2M_EXT_BACKEND=torch) sparsifies and
    elects sign in torch. On bfloat16 copies of the models, whose task vectors tie at nearly
    every cut (the first of the tied entries in index order are kept), the same bytes."""
    from safetensors.torch import load_file, save_file

    copies = tmp_path / "bf16"
    for model in ("base", "m1", "m2", "m3"):
        (copies / model).mkdir(parents=True)
        for path in (models / model).iterdir():
            if path.suffix == ".safetensors":
                shard = {k: v.bfloat16() for k, v in load_file(path).items()}
                save_file(shard, str(copies / model / path.name), metadata={"format": "pt"})
            else:
                (copies / model / path.name).write_bytes(path.read_bytes())
    config = write_config(tmp_path, copies, DETERMINISTIC_CONFIGS["ties"])
    outputs = {}
    for backend in ("native", "torch"):
        env = {**os.environ, "R2M_EXT_BACKEND": backend}
        out = tmp_path / backend
        command = [sys.executable, "-m", "r2m_ext", "merge", "--config", config, "--out", out]
        result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        outputs[backend] = tensors_in(out)
    assert sorted(outputs["native"]) == sorted(outputs["torch"])
    for name, value in outputs["torch"].items():
        assert torch.equal(outputs["native"][name], value), name


@pytest.mark.parametrize("method", ["ties", "linear"])  # the fused TIES and the combination
def test_nan_in_a_model_is_named_and_leaves_no_output(models, tmp_path, method):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "m2"
    broken.mkdir()
    for path in (models / "m2").iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    shard = sorted(broken.glob("*.safetensors"))[1]
    weights = load_file(shard)
    name = sorted(weights)[0]
    weights[name].view(-1)[3] = float("nan")
    save_file(weights, str(shard), metadata={"format": "pt"})
    parameters = "{weight: 0.5, density: 0.4}" if method == "ties" else "{weight: 0.5}"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"merge_method: {method}\n"
        + (f"base_model: {models}/base\n" if method == "ties" else "")
        + f"models:\n  - {{model: {models}/m1, parameters: {parameters}}}\n"
        + f"  - {{model: {broken}, parameters: {parameters}}}\n"
        + "dtype: float32\n"
    )
    with pytest.raises(R2MError, match=rf"'{name}' in {shard}.* NaN or Inf"):
        r2m_ext.merge_config(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_config_against_mergekit_yaml(models, tmp_path):
    """The two command lines on one YAML: mergekit-yaml and r2m merge --config; the recipe
    r2m_ext writes re-runs the merge to the same bytes."""
    config = write_config(tmp_path, models, DETERMINISTIC_CONFIGS["ties"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    mergekit_yaml = Path(sys.executable).with_name("mergekit-yaml")
    subprocess.run(
        [mergekit_yaml, config, tmp_path / "mk", "--no-write-model-card", "--no-copy-tokenizer"],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )
    done = run_cli("merge", "--config", config, "--out", tmp_path / "r2m", "--quiet")
    assert done.returncode == 0, done.stderr
    assert_same_merge(tensors_in(tmp_path / "r2m"), tensors_in(tmp_path / "mk"))
    assert (tmp_path / "r2m" / "config.json").is_file()
    again = run_cli(
        "merge", "--config", tmp_path / "r2m" / "r2m_recipe.yaml", "--out", tmp_path / "again"
    )
    assert again.returncode == 0, again.stderr
    for shard in (tmp_path / "r2m").glob("*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "again" / shard.name).read_bytes()


def test_dare_linear_agrees_with_mergekit_except_the_mask(models, tmp_path):
    """DARE's masks differ by construction (r2m_ext's is a function of seed and tensor name,
    mergekit's is torch.bernoulli's stream). With one expert of weight 1, update = mask * tau *
    ||tau||_1 / ||mask * tau||_1 in both: the kept fraction is density up to sampling, every kept
    entry is tau times one factor per tensor, and the L1 norm is tau's."""
    config = write_config(
        tmp_path,
        models,
        """
merge_method: dare_linear
base_model: MODELS/base
models:
  - {model: MODELS/m1, parameters: {weight: 1.0, density: 0.4}}
dtype: float32
""",
    )
    base, expert = tensors_in(models / "base"), tensors_in(models / "m1")
    for merged in (
        run_mergekit(config, tmp_path / "mk"),
        tensors_in(r2m_ext.merge_config(config, tmp_path / "r2m")),
    ):
        kept_total = count_total = 0
        for name, value in merged.items():
            tau = (expert[name] - base[name]).double()
            update = (value - base[name]).double()
            kept = update != 0
            kept_total += int(kept.sum())
            count_total += tau.numel()
            factor = update[kept] / tau[kept]
            # float32: update = (base + kept * scale) - base rounds at |base|'s precision.
            assert torch.allclose(factor, factor.median().expand_as(factor), rtol=1e-3), name
            assert math.isclose(update.abs().sum(), tau.abs().sum(), rel_tol=1e-4), name
        spread = 4 * math.sqrt(0.4 * 0.6 / count_total)
        assert abs(kept_total / count_total - 0.4) < spread


def test_dare_mask_is_reproducible_and_seeded(models, tmp_path):
    text = """
merge_method: dare_ties
base_model: MODELS/base
models:
  - {model: MODELS/m1, parameters: {weight: 1.0, density: 0.5}}
  - {model: MODELS/m2, parameters: {weight: 1.0, density: 0.5}}
"""
    config = write_config(tmp_path, models, text)
    first = tensors_in(r2m_ext.merge_config(config, tmp_path / "a"))
    again = tensors_in(r2m_ext.merge_config(config, tmp_path / "b", max_memory="300KB"))
    other = tensors_in(r2m_ext.merge_config(config, tmp_path / "c", seed=1))
    name = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(first[name], other[name])


SETTINGS = [
    0.5,
    "1e-3",  # YAML reads 1e-3 as a string; mergekit's numbers accept it
    [0.0, 1.0],
    [0.2, 0.4, 1.0, 0.0],
    {"filter": "mlp", "value": 0.7},
    [{"filter": "mlp", "value": [0.1, 0.9]}, {"filter": "attn", "value": 2}, {"value": 0.3}],
    [{"filter": "*", "value": 0.25}],
    [{"filter": "nothing", "value": 1.0}],  # no match: no value
]


@pytest.mark.parametrize("setting", SETTINGS, ids=range(len(SETTINGS)))
def test_settings_evaluate_as_mergekit_evaluates_them(setting):
    for tensor in ("model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        for t in (0.0, 0.3, 0.5, 1.0):
            want = mergekit_evaluate_setting(tensor, _mergekit_form(setting), t, validate=float)
            got = evaluate_setting(setting, tensor, t, float, "test")
            assert got == pytest.approx(want, rel=1e-15, abs=0) if want is not None else got is None


def _mergekit_form(setting):
    """A setting as mergekit holds it after pydantic: {filter, value} items as its model."""
    from mergekit.config import ConditionalParameter

    if isinstance(setting, dict):
        return ConditionalParameter(**setting)
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        return [ConditionalParameter(**item) for item in setting]
    return setting


def test_layer_position_by_hand():
    assert layer_position("model.layers.0.mlp.up_proj.weight", 3) == 0.0
    assert layer_position("model.layers.1.mlp.up_proj.weight", 3) == 0.5
    assert layer_position("model.layers.2.mlp.up_proj.weight", 3) == 1.0
    assert layer_position("model.embed_tokens.weight", 3) == 0.0
    assert layer_position("lm_head.weight", 3) == 0.0
    assert layer_position("transformer.h.0.attn.c_attn.weight", 1) == 1.0


# Pieces of the refused configs below.
LINEAR = "merge_method: linear\n"
TIES = "merge_method: ties\nbase_model: MODELS/base\n"
TWO = "models: [{model: MODELS/m1}, {model: MODELS/m2}]\nparameters: {weight: 1}\n"
ONE = "models: [{model: MODELS/m1, parameters: {weight: 1}}]\n"
BAD_CONFIGS = {
    "slices": (
        "merge_method: passthrough\nslices: [{sources: [{model: MODELS/m1, layer_range: [0, 2]}]}]",
        "'slices'",
    ),
    "modules": (LINEAR + "modules: {text: {models: [{model: MODELS/m1}]}}\n", "'modules'"),
    "tokenizer": (LINEAR + TWO + "tokenizer_source: union\n", "'tokenizer_source'"),
    "chat_template": (LINEAR + TWO + "chat_template: chatml\n", "'chat_template'"),
    "lora_missing": (TIES + "models: [{model: MODELS/base+MODELS/nothing}]\n", "not a local path"),
    "lora_not_adapter": (TIES + "models: [{model: MODELS/base+MODELS/m2}]\n", "not a PEFT LoRA"),
    "hub_id": (TIES + "models: [{model: mistralai/Mistral-7B-v0.1}]\n", "not a local path"),
    "method": ("merge_method: slerp\nbase_model: MODELS/base\n" + ONE, "'slerp' is not supported"),
    "unknown_key": (LINEAR + TWO + "model_name: x\n", "model_name"),
    "unknown_parameter": (TIES + ONE + "parameters: {densty: 0.5}\n", "'densty'"),
    "no_weight": (TIES + "models: [{model: MODELS/m1, parameters: {density: 0.5}}]\n", "'weight'"),
    "no_base": ("merge_method: ties\n" + ONE, "needs a 'base_model'"),
    "bad_value": (TIES + "models: [{model: MODELS/m1}]\nparameters: {weight: heavy}\n", "a number"),
    "bad_dtype": (LINEAR + TWO + "dtype: int8\n", "'dtype: int8'"),
    "only_base": (TIES + "models: [{model: MODELS/base}]\n", "no model besides the base"),
    "twice": (LINEAR + "models: [{model: MODELS/m1}, {model: MODELS/m1}]\n", "a second time"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_unsupported_configs_are_refused_naming_the_key(models, tmp_path, name):
    text, expected = BAD_CONFIGS[name]
    config = write_config(tmp_path, models, text)
    with pytest.raises(R2MError, match="config.yaml") as caught:
        r2m_ext.merge_config(config, tmp_path / "out")
    assert expected in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_cli_refusal_leaves_no_output(models, tmp_path):
    text, _ = BAD_CONFIGS["tokenizer"]
    config = write_config(tmp_path, models, text)
    done = run_cli("merge", "--config", config, "--out", tmp_path / "out")
    assert done.returncode != 0
    assert "tokenizer_source" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


# r2m_ext's TSV-M and CART registered inside mergekit (integrations/mergekit.py).
PLUGIN_CONFIG = """
merge_method: {method}
base_model: MODELS/base
models: [{{model: MODELS/m1}}, {{model: MODELS/m2}}, {{model: MODELS/m3}}]
parameters: {parameters}
dtype: float32
"""


def test_runner_runs_tsv_inside_mergekit_equal_to_r2m_ext(models, tmp_path):
    """`python -m r2m_ext.integrations.mergekit` (mergekit-yaml with the methods registered),
    randomized SVD with r2m_ext's defaults: the same tensors as r2m_ext's own tsv merge."""
    config = write_config(
        tmp_path, models, PLUGIN_CONFIG.format(method="r2m_tsv", parameters="{alpha: 0.9}")
    )
    done = subprocess.run(
        [sys.executable, "-m", "r2m_ext.integrations.mergekit", config, tmp_path / "mk"]
        + ["--no-write-model-card", "--no-copy-tokenizer"],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(Path(r2m_ext.__file__).parents[1]),
        },
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    experts = [models / f"m{i}" for i in (1, 2, 3)]
    own = r2m_ext.merge_files(
        models / "base", experts, tmp_path / "own", "tsv", head_patterns=(), alpha=0.9
    )
    assert_same_merge(tensors_in(tmp_path / "mk"), tensors_in(own))


@pytest.mark.parametrize(
    "method, parameters, ours",
    [
        (
            "r2m_cart",
            "{rank_ratio: 0.25, lam: 1.5, svd: exact}",
            {"rank_ratio": 0.25, "lam": 1.5, "svd": "exact"},
        ),
        ("r2m_cart", "{}", {}),
        ("r2m_tsv", "{svd: exact, alpha: 1.0}", {"svd": "exact"}),
    ],
)
def test_registered_methods_equal_r2m_exts_own(models, tmp_path, method, parameters, ours):
    from r2m_ext.integrations.mergekit import register

    register()
    register()  # twice: once in mergekit's registry
    config = write_config(
        tmp_path, models, PLUGIN_CONFIG.format(method=method, parameters=parameters)
    )
    theirs = run_mergekit(config, tmp_path / "mk")
    experts = [models / f"m{i}" for i in (1, 2, 3)]
    own = r2m_ext.merge_files(
        models / "base",
        experts,
        tmp_path / "own",
        method.removeprefix("r2m_"),
        head_patterns=(),
        **ours,
    )
    assert_same_merge(theirs, tensors_in(own))


def test_registered_method_refuses_bad_options_with_r2m_exts_message(models, tmp_path):
    from r2m_ext.integrations.mergekit import register

    register()
    config = write_config(
        tmp_path, models, PLUGIN_CONFIG.format(method="r2m_cart", parameters="{rank_ratio: 1.5}")
    )
    with pytest.raises(Exception, match="rank_ratio"):
        run_mergekit(config, tmp_path / "mk")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # native select / sort
def test_top_entries_take_exactly_count_first_among_ties(dtype):
    from r2m_ext.methods.mergekit_semantics import _top_entries

    values = torch.tensor([0.5, -2.0, 1.0, -1.0, 0.0, -0.0, 1.0, 3.0, -1.0, 0.25], dtype=dtype)
    # By magnitude: 3 (7), 2 (1), then four 1s (2, 3, 6, 8) taken in index order.
    for count, want in [
        (0, []),
        (1, [7]),
        (2, [1, 7]),
        (3, [1, 2, 7]),
        (5, [1, 2, 3, 6, 7]),
        (6, [1, 2, 3, 6, 7, 8]),
        (7, [0, 1, 2, 3, 6, 7, 8]),
        (9, [0, 1, 2, 3, 4, 6, 7, 8, 9]),  # one of the two zeros: the first
        (10, list(range(10))),
    ]:
        got = torch.nonzero(_top_entries(values, count)).view(-1).tolist()
        assert got == want, count
    generator = torch.Generator().manual_seed(0)
    many = torch.randn(10_000, generator=generator, dtype=dtype).round(decimals=2)  # ties
    previous = _top_entries(many, 0)
    for count in (1, 17, 2_000, 2_001, 9_999):
        kept = _top_entries(many, count)
        assert int(kept.sum()) == count
        assert bool((kept | ~previous).all())  # nested
        assert many.abs()[kept].min() >= many.abs()[~kept].max()
        previous = kept


@pytest.fixture(scope="module")
def adapter(models) -> Path:
    """A PEFT LoRA adapter (random factors) on the base of `models`."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(7)
    model = LlamaForCausalLM.from_pretrained(models / "base")
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(models / "adapter")
    return models / "adapter"


def test_base_plus_lora_merges_as_mergekit_applies_it(models, adapter, tmp_path):
    """`BASE+ADAPTER` in a config is the adapter as an expert: the same tensors as mergekit,
    which merges the adapter into the base with PEFT first."""
    config = write_config(
        tmp_path,
        models,
        """
merge_method: ties
base_model: MODELS/base
models:
  - {model: MODELS/base+MODELS/adapter, parameters: {weight: 0.7, density: 0.5}}
  - {model: MODELS/m2, parameters: {weight: 0.4, density: 0.5}}
dtype: float32
""",
    )
    document = MergeConfiguration.model_validate(yaml.safe_load(config.read_text()))
    options = MergekitOptions(
        write_model_card=False,
        copy_tokenizer=False,
        quiet=True,
        lora_merge_cache=str(tmp_path / "cache"),
    )
    run_merge(document, str(tmp_path / "mk"), options=options)
    out = r2m_ext.merge_config(config, tmp_path / "r2m")
    assert_same_merge(tensors_in(out), tensors_in(tmp_path / "mk"))


def test_lora_on_another_model_than_the_base_is_refused(models, adapter, tmp_path):
    config = write_config(tmp_path, models, TIES + "models: [{model: MODELS/m1+MODELS/adapter}]\n")
    with pytest.raises(R2MError, match="applies a LoRA adapter to the merge's base"):
        r2m_ext.merge_config(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
