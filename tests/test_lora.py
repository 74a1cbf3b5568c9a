"""PEFT LoRA adapters as experts (io/lora.py), checked against PEFT itself: adapters created with
PEFT on a tiny Llama built from a config (no download), with random non-zero factors, several
ranks, rsLoRA, rank/alpha patterns, an adapted embedding, modules_to_save on the head, trained
biases, and a dense expert in the mix; every method's merge of the adapters equals its merge of
the same experts materialised by PEFT's merge_and_unload()."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import r2m_ext
from r2m_ext.errors import R2MError
from tests.checkpoints import tensors_in
from tests.conftest import relative_error, run_cli

peft = pytest.importorskip("peft")
from peft import LoHaConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

METHODS = ("r2m", "average", "task_arithmetic", "ties", "dare", "tsv", "cart")


def llama_config(hidden: int = 32) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        tie_word_embeddings=False,
    )


def make_adapter(base_dir: Path, out: Path, config, seed: int, biases: bool = False, **save):
    """A PEFT adapter with random factors (init_lora_weights=False) and, with `biases`, moved
    biases of the adapted modules."""
    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config)
    if biases:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith(".bias") and parameter.requires_grad:
                    parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(out, **save)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base/; adapters a1 (rsLoRA, rank and alpha patterns, embedding, head in
    modules_to_save), a2 (rank 2, biases, saved as .bin), a3 (rank 8); d1..d3 the same merged by
    PEFT; dense/ a full fine-tune."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config())
    base.save_pretrained(root / "base")
    adapters = {
        "a1": (
            LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj", "embed_tokens"],
                init_lora_weights=False,
                modules_to_save=["lm_head"],
                use_rslora=True,
                rank_pattern={"layers.1.self_attn.q_proj": 2},
                alpha_pattern={"v_proj": 3},
            ),
            {},
            False,
        ),
        "a2": (
            LoraConfig(
                r=2,
                lora_alpha=4,
                target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                init_lora_weights=False,
                bias="lora_only",
            ),
            {"safe_serialization": False},
            True,
        ),
        "a3": (LoraConfig(r=8, lora_alpha=16, init_lora_weights=False), {}, False),
    }
    for i, (name, (config, save, biases)) in enumerate(adapters.items(), start=1):
        path = make_adapter(root / "base", root / name, config, seed=i, biases=biases, **save)
        merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "base"), path)
        merged.merge_and_unload().save_pretrained(root / f"d{i}")
    dense = LlamaForCausalLM(llama_config())
    with torch.no_grad():
        for parameter, original in zip(dense.parameters(), base.parameters(), strict=True):
            parameter.copy_(original + 0.02 * torch.randn_like(original))
    dense.save_pretrained(root / "dense")
    return root


def test_the_adapter_reads_as_peft_merges_it(models):
    """Every tensor of each adapter's expert is PEFT's merged model: read whole, bit for bit; in
    row blocks, to float rounding."""
    from r2m_ext.io import open_source

    base = open_source(models / "base")
    for i in (1, 2, 3):
        source = open_source(models / f"a{i}", base=base)
        want = tensors_in(models / f"d{i}")
        assert sorted(source.metadata()) == sorted(want)
        for name, value in want.items():
            assert torch.equal(source.read(name), value), (i, name)
            # A row block: its own product, equal to float rounding.
            assert relative_error(source.read(name, slice(1, 3)), value[1:3]) < 1e-6, (i, name)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_merges_adapters_as_their_dense_experts(models, tmp_path, method):
    experts = [models / "a1", models / "a2", models / "a3", models / "dense"]
    dense = [models / "d1", models / "d2", models / "d3", models / "dense"]
    for compute_dtype in ("float64", "float32"):
        options = {"compute_dtype": compute_dtype}
        got = r2m_ext.merge_files(
            models / "base", experts, tmp_path / f"a_{compute_dtype}", method, **options
        )
        want = r2m_ext.merge_files(
            models / "base", dense, tmp_path / f"d_{compute_dtype}", method, **options
        )
        got, want = tensors_in(got), tensors_in(want)
        assert sorted(got) == sorted(want)
        tolerance = 1e-5 if compute_dtype == "float64" else 1e-4
        for name in want:
            assert relative_error(got[name], want[name]) <= tolerance, (compute_dtype, name)


def test_cli_merges_adapters_and_inspects_one(models, tmp_path):
    done = run_cli(
        "merge",
        "--base", models / "base",
        "--expert", models / "a1",
        "--expert", models / "a3",
        "--method", "ties",
        "--max-memory", "2MB",
        "--out", tmp_path / "out",
        "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    want = r2m_ext.merge_files(
        models / "base", [models / "d1", models / "d3"], tmp_path / "dense", "ties"
    )
    got, want = tensors_in(tmp_path / "out"), tensors_in(want)
    assert all(relative_error(got[n], want[n]) <= 1e-4 for n in want)
    shown = run_cli("inspect", models / "a1")
    assert shown.returncode == 0, shown.stderr
    assert "rsLoRA" in shown.stdout
    line = next(
        x for x in shown.stdout.splitlines() if x.startswith("model.layers.1.self_attn.q_proj")
    )
    assert line.split()[1:4] == ["2", "8", "5.657"]  # rank pattern, alpha 8 / sqrt(2)
    assert "lm_head.weight: saved whole" in shown.stdout


def _write_adapter(tmp_path, models, name, config, base_config=None):
    base_dir = models / "base"
    if base_config is not None:
        torch.manual_seed(0)
        LlamaForCausalLM(base_config).save_pretrained(tmp_path / "other_base")
        base_dir = tmp_path / "other_base"
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


BAD_ADAPTERS = {
    "dora": (lambda: LoraConfig(r=2, use_dora=True, init_lora_weights=False), None, "DoRA"),
    "loha": (lambda: LoHaConfig(r=2, target_modules=["q_proj"]), None, "peft_type 'LOHA'"),
    "shape": (
        lambda: LoraConfig(r=2, init_lora_weights=False),
        lambda: llama_config(hidden=16),
        "the update is",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapters_are_refused_naming_file_and_feature(models, tmp_path, case):
    config, base_config, expected = BAD_ADAPTERS[case]
    adapter = _write_adapter(
        tmp_path, models, case, config(), None if base_config is None else base_config()
    )
    with pytest.raises(R2MError, match=expected) as caught:
        r2m_ext.merge_files(models / "base", [adapter, models / "a3"], tmp_path / "out", "average")
    assert str(adapter) in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_module_without_a_base_tensor_and_adapter_as_base_are_refused(models, tmp_path):
    adapter = tmp_path / "renamed"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes(
        (models / "a3" / "adapter_config.json").read_bytes()
    )
    from safetensors.torch import save_file

    factors = load_file(models / "a3" / "adapter_model.safetensors")
    save_file(
        {k.replace("layers.0.", "layers.7."): v for k, v in factors.items()},
        adapter / "adapter_model.safetensors",
    )
    with pytest.raises(R2MError, match="layers.7.self_attn.q_proj' has no weight in the base"):
        r2m_ext.merge_files(models / "base", [adapter, models / "a3"], tmp_path / "out", "average")
    with pytest.raises(R2MError, match="cannot be the base"):
        r2m_ext.merge_files(
            models / "a3", [models / "a1", models / "a2"], tmp_path / "out", "average"
        )
    assert not (tmp_path / "out").exists()


def test_fan_in_fan_out_adapter_reads_as_peft_merges_it(tmp_path):
    """GPT-2's Conv1D stores weights [in, out]: PEFT's fan_in_fan_out transposes the update."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from r2m_ext.io import open_source

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    lora = LoraConfig(
        r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False
    )
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), lora)
    model.save_pretrained(tmp_path / "adapter")
    merged = PeftModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    )
    want = merged.merge_and_unload().state_dict()
    source = open_source(tmp_path / "adapter", base=open_source(tmp_path / "base"))
    changed = 0
    for name in source.metadata():
        got = source.read(name)
        assert torch.equal(got, want[name]), name
        changed += not torch.equal(got, open_source(tmp_path / "base").read(name))
    assert changed == 4  # c_attn and c_fc of both layers


def test_adapter_of_a_task_model_applies_to_its_backbone(models, tmp_path):
    """An adapter saved on LlamaForCausalLM (model.layers...) merged onto a checkpoint of the
    backbone alone (layers..., no `model.` prefix)."""
    from safetensors.torch import save_file

    from r2m_ext.io import open_source

    backbone = tmp_path / "backbone"
    backbone.mkdir()
    full = tensors_in(models / "base")
    save_file(
        {k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")},
        backbone / "model.safetensors",
    )
    source = open_source(models / "a3", base=open_source(backbone))
    want = tensors_in(models / "d3")
    for name in source.metadata():
        assert torch.equal(source.read(name), want["model." + name]), name


# -- the merge written as a PEFT adapter (--out-format peft) -----------------------------------
ADAPTERS = ("a1", "a2", "a3")


def peft_merged(models, adapter_dir) -> tuple[dict, torch.nn.Module]:
    """The weights and model PEFT gives for `adapter_dir` on the base, merged."""
    base = LlamaForCausalLM.from_pretrained(models / "base")
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return model.state_dict(), model


def dense_update(models, merged: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    base = load_file(models / "base" / "model.safetensors")
    return merged[name].double() - base[name].double()


@pytest.mark.parametrize("method", ("average", "task_arithmetic", "r2m", "cart", "tsv"))
def test_adapter_output_is_the_dense_merge_exactly(models, tmp_path, method):
    """The methods whose update stays in the experts' factor span: the adapter PEFT loads is the
    dense merge, weights and forward pass, and every module keeps all its energy."""
    experts = [models / name for name in ADAPTERS]
    dense = tensors_in(r2m_ext.merge_files(models / "base", experts, tmp_path / "d", method))
    report: dict = {}
    out = r2m_ext.merge_files(
        models / "base", experts, tmp_path / "a", method, out_format="peft", report=report
    )
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("r2m_")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "report.json",
    ]
    weights, model = peft_merged(models, out)
    for name, want in dense.items():
        assert relative_error(weights[name], want) <= 1e-5, name
    modules = report["adapter"]["modules"]
    assert len(modules) == 11  # every module any adapter updates, embedding included
    assert all(abs(m["energy_kept"] - 1) < 1e-9 for m in modules.values())
    # The update of layer 0's q_proj has the rank of all three adapters' factors: 4 + 2 + 8.
    assert modules["model.layers.0.self_attn.q_proj"]["rank"] == 14
    reference = LlamaForCausalLM.from_pretrained(models / "base")
    reference.load_state_dict(dense)
    tokens = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        assert relative_error(model(tokens).logits, reference(tokens).logits) <= 1e-5


@pytest.mark.parametrize("method", ("r2m", "ties"))
def test_max_rank_gives_the_best_rank_r_adapter_and_says_what_it_kept(models, tmp_path, method):
    """--max-rank 3: each module's factors are the best rank-3 approximation of its merged
    update (Eckart-Young, from the update's own SVD: exact where the update is in the span, a
    randomized sketch's near-best for TIES), with the energy they keep reported."""
    experts = [models / name for name in ADAPTERS]
    dense = tensors_in(r2m_ext.merge_files(models / "base", experts, tmp_path / "d", method))
    done = run_cli(
        "merge", "--base", models / "base", *[a for e in experts for a in ("--expert", e)],
        "--method", method, "--out-format", "peft", "--max-rank", "3", "--out", tmp_path / "a",
        "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    weights, _ = peft_merged(models, tmp_path / "a")
    for module, figures in report["adapter"]["modules"].items():
        name = module + ".weight"
        update = dense_update(models, dense, name)
        singular = torch.linalg.svdvals(update)
        best = float(singular[3:].square().sum().sqrt())
        error = float((dense_update(models, weights, name) - update).norm())
        slack = 1e-6 if method == "r2m" else 0.05
        assert error <= best * (1 + slack) + 1e-6 * float(update.norm()), module
        # At most 3; fewer where the adapters' factors span fewer (a rank-2 adapter's module).
        numerical_rank = int((singular > 1e-5 * singular[0]).sum())
        assert min(3, numerical_rank) <= figures["rank"] <= 3
        if method == "ties":
            assert figures["rank"] == 3
        kept = 1 - error**2 / float(update.square().sum())
        assert figures["energy_kept"] == pytest.approx(kept, abs=1e-4)


def test_adapter_output_refuses_what_it_cannot_write(models, tmp_path):
    experts = [models / "a1", models / "a3"]
    cases = [
        ({"method": "ties", "out_format": "peft"}, experts, "pass --max-rank R"),
        ({"method": "dare", "out_format": "peft"}, experts, "pass --max-rank R"),
        ({"out_format": "peft"}, [*experts, models / "d2"], "d2: a dense expert's update"),
        (
            {"out_format": "peft", "max_rank": 4},
            [*experts, models / "dense"],  # a full fine-tune: its norms are no LoRA module
            r"differs from the base's .*\(the dense expert .*dense changes it\)",
        ),
        ({"out_format": "peft", "max_rank": 4}, [models / "d1"], "needs LoRA adapters among"),
        ({"max_rank": 3}, experts, "--max-rank applies to --out-format peft"),
        ({"out_format": "gguf"}, experts, "out_format must be one of"),
    ]
    for arguments, inputs, message in cases:
        with pytest.raises(R2MError, match=message):
            r2m_ext.merge_files(models / "base", inputs, tmp_path / "out", **arguments)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ("average", "ties"))
def test_dense_experts_join_an_adapter_output_with_max_rank(models, tmp_path, method):
    """A dense expert whose changes lie in the LoRA experts' modules (d3: a3 merged into the
    weights by PEFT) merges into an adapter with --max-rank: each module's best rank-R factors
    of the merged update, here R >= its rank, so the adapter is the dense merge to rounding."""
    experts = [models / "a1", models / "a2", models / "d3"]
    dense = tensors_in(r2m_ext.merge_files(models / "base", experts, tmp_path / "d", method))
    report: dict = {}
    out = r2m_ext.merge_files(
        models / "base",
        experts,
        tmp_path / "a",
        method,
        out_format="peft",
        max_rank=16 if method == "average" else 32,  # 4 + 2 + 8 for q_proj; TIES: full rank
        report=report,
    )
    weights, _ = peft_merged(models, out)
    for name, want in dense.items():
        assert relative_error(weights[name], want) <= 1e-5, name
    modules = report["adapter"]["modules"]
    assert all(m["energy_kept"] > 1 - 1e-9 for m in modules.values())


def test_adapter_recipe_reruns_to_the_same_bytes(models, tmp_path):
    experts = [models / name for name in ADAPTERS]
    first = r2m_ext.merge_files(
        models / "base", experts, tmp_path / "a", "r2m", out_format="peft", max_rank=5
    )
    again = r2m_ext.merge_config(first / "r2m_recipe.yaml", tmp_path / "b")
    weights = "adapter_model.safetensors"
    assert (first / weights).read_bytes() == (again / weights).read_bytes()
    assert json.loads((again / "adapter_config.json").read_text())["r"] == 5


# -- R²M's truncation from the adapters' factors (no m x n residual, nothing sketched) ----------
@pytest.mark.parametrize("svd, rank_ratio", [("exact", 0.1), ("randomized", 0.1), ("exact", 0.5)])
def test_r2m_truncates_lora_experts_from_their_factors_exactly(models, tmp_path, svd, rank_ratio):
    """All experts LoRA adapters: every truncated matrix they update is truncated from their
    factors (QR of the stacked factors, SVD of the small core), equal to the exact SVD of the
    dense residuals of PEFT's materialised experts: for svd=randomized too (nothing is sketched),
    where rho < sum r_j (rank_ratio 0.1: rho 3) and where it keeps everything (0.5: rho 16)."""
    options = {"compute_dtype": "float64", "rank_ratio": rank_ratio}
    report: dict = {}
    got = r2m_ext.merge_files(
        models / "base",
        [models / name for name in ADAPTERS],
        tmp_path / "a",
        "r2m",
        svd=svd,
        report=report,
        **options,
    )
    want = r2m_ext.merge_files(
        models / "base",
        [models / f"d{i}" for i in (1, 2, 3)],
        tmp_path / "d",
        "r2m",
        svd="exact",
        **options,
    )
    got, want = tensors_in(got), tensors_in(want)
    for name in want:
        assert relative_error(got[name], want[name]) <= 1e-6, name
    tensors = report["tensors"]
    factored = {name for name, figures in tensors.items() if figures.get("factored")}
    # Every truncated matrix but lm_head (saved whole by a1: not a low-rank update).
    assert "lm_head.weight" not in factored and "model.layers.0.self_attn.q_proj.weight" in factored
    assert factored == {n for n, f in tensors.items() if "rank" in f} - {"lm_head.weight"}
    if rank_ratio == 0.5:  # rho 16 >= sum r_j (4 + 2 + 8; 2): the residuals are kept whole
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"):
            assert min(tensors[name]["energy_kept"]) > 1 - 1e-12, name
    else:  # rho 3 < 14: cut
        assert min(tensors["model.layers.0.self_attn.q_proj.weight"]["energy_kept"]) < 0.99


def test_factored_truncation_recomputed_in_the_write_pass_gives_the_same_merge(models, tmp_path):
    experts = [models / name for name in ADAPTERS]
    kept = r2m_ext.merge_files(models / "base", experts, tmp_path / "kept", "r2m")
    report: dict = {}
    recomputed = r2m_ext.merge_files(
        models / "base",
        experts,
        tmp_path / "again",
        "r2m",
        max_memory="100KB",  # no room to keep any factor: all recomputed
        scratch_dir="none",
        report=report,
    )
    assert report["factors_recomputed"] == 15
    assert report["factorisations"]["R²M write pass"] > 0
    kept, recomputed = tensors_in(kept), tensors_in(recomputed)
    for name in kept:
        assert relative_error(recomputed[name], kept[name]) <= 1e-6, name


def test_nan_in_the_base_under_lora_experts_is_still_named(models, tmp_path):
    """The factored Gram and truncation read no base tensor: the write pass finds it."""
    base = tmp_path / "base"
    base.mkdir()
    for path in (models / "base").iterdir():
        (base / path.name).write_bytes(path.read_bytes())
    weights = load_file(base / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.weight"][3, 4] = float("nan")
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    experts = [models / name for name in ADAPTERS]
    with pytest.raises(R2MError, match=r"'model.layers.0.self_attn.q_proj.weight' in .*base"):
        r2m_ext.merge_files(base, experts, tmp_path / "out", "r2m")
    assert not (tmp_path / "out").exists()


# -- merges from the factors: average, task arithmetic and R²M never densify an expert ----------
@pytest.mark.parametrize("method", ("average", "task_arithmetic"))
@pytest.mark.parametrize("max_memory", (None, "100KB"))
def test_linear_methods_merge_lora_experts_from_their_factors(models, tmp_path, method, max_memory):
    """All experts adapters: a matrix's merged update is their factors side by side, scaled (one
    product onto the base, or under a budget too small for the base whole the dense path over
    row blocks), equal to the merge of PEFT's materialised experts."""
    options = {"compute_dtype": "float64", "max_memory": max_memory}
    got = r2m_ext.merge_files(
        models / "base", [models / n for n in ADAPTERS], tmp_path / "a", method, **options
    )
    dense = [models / f"d{i}" for i in (1, 2, 3)]
    want = r2m_ext.merge_files(models / "base", dense, tmp_path / "d", method, **options)
    got, want = tensors_in(got), tensors_in(want)
    assert sorted(got) == sorted(want)
    for name in want:
        # PEFT's materialised experts hold W + s B A rounded to float32; the factors do not.
        assert relative_error(got[name], want[name]) <= 1e-6, name


@pytest.mark.parametrize("method", ("average", "r2m"))
def test_adapter_output_reads_no_base_matrix_the_experts_update_by_factors(
    models, tmp_path, method
):
    """Writing an adapter, the matrices merged from factors read nothing: exactly the base bytes
    of those matrices fewer than the same merge written as a model (which adds the base)."""
    experts = [models / n for n in ADAPTERS]
    reports: dict = {"model": {}, "peft": {}}
    for out_format, report in reports.items():
        r2m_ext.merge_files(
            models / "base",
            experts,
            tmp_path / out_format,
            method,
            out_format=out_format if out_format == "peft" else "safetensors",
            report=report,
        )
    base = load_file(models / "base" / "model.safetensors")
    adapted = {
        name
        for name, tensor in base.items()
        # a1 saves the head whole (modules_to_save) and its adapted embedding layer beside it
        if tensor.dim() == 2 and name not in ("lm_head.weight", "model.embed_tokens.weight")
    }
    read = {
        k: sum(p["input_bytes_read"] for p in r["io_bytes"].values()) for k, r in reports.items()
    }
    base_bytes = sum(base[n].numel() * base[n].element_size() for n in adapted)
    assert read["model"] - read["peft"] == base_bytes


# -- TSV-M and CART from the factors, against the float64 NumPy references of the spec ---------
def hand_sized_adapters(root: Path, ranks=(3, 4, 5)) -> tuple[Path, list[Path], list[dict]]:
    """A float64 base with two matrices and a vector, and one adapter per rank written by hand
    (PEFT's layout: base_model.model.<module>.lora_A/B.weight, lora_alpha 2r); also the experts
    they make, materialised in float64 from the same float32 factors."""
    g = torch.Generator().manual_seed(7)
    base = {
        "layer.weight": torch.randn(12, 9, generator=g, dtype=torch.float64),
        "other.weight": torch.randn(10, 10, generator=g, dtype=torch.float64),
        "norm.weight": torch.ones(9, dtype=torch.float64),
    }
    (root / "base").mkdir(parents=True)
    save_file(base, str(root / "base" / "model.safetensors"), metadata={"format": "pt"})
    adapters, dense = [], []
    for i, rank in enumerate(ranks):
        factors, expert = {}, dict(base)
        for module in ("layer", "other"):
            rows, columns = base[f"{module}.weight"].shape
            a = torch.randn(rank, columns, generator=g)
            b = torch.randn(rows, rank, generator=g)
            factors[f"base_model.model.{module}.lora_A.weight"] = a
            factors[f"base_model.model.{module}.lora_B.weight"] = b
            expert[f"{module}.weight"] = base[f"{module}.weight"] + 2.0 * b.double() @ a.double()
        directory = root / f"lora{i}"
        directory.mkdir()
        save_file(factors, str(directory / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}
        config["target_modules"] = ["layer", "other"]
        (directory / "adapter_config.json").write_text(json.dumps(config))
        adapters.append(directory)
        dense.append(expert)
    return root / "base", adapters, dense


@pytest.mark.parametrize(
    "method, ranks, options",
    [
        ("tsv", (3, 4, 5), {}),
        ("tsv", (3, 4, 5), {"alpha": 0.7}),
        ("cart", (3, 4, 5), {}),  # rho 1 of sum r_j 12
        ("cart", (3, 4, 5), {"rank_ratio": 0.5, "lam": 1.5}),  # rho 4 and 5
        ("r2m", (3, 4, 5), {"rank_ratio": 0.1}),  # rho 1 < sum r_j 12: cut
        ("r2m", (3, 4, 5), {"rank_ratio": 0.5}),  # rho 4 and 5 < 12: cut
        ("r2m", (1, 1, 2), {"rank_ratio": 0.5}),  # rho 4 and 5 >= 4: residuals kept whole
    ],
)
def test_svd_methods_merge_lora_experts_from_factors_as_the_float64_reference(
    tmp_path, method, ranks, options
):
    """R²M (its Gram, residual truncation and write), TSV-M and CART from the factors against
    the spec's NumPy implementations on the materialised experts (explicit projector, NumPy
    SVDs, TSV-M's polar factor by eigh), for svd=exact and randomized (nothing is sketched).
    Every expert keeps at least TSV-M's floor(min(m, n) / N) = 3 triplets, so the factored
    TSV-M is the spec's exactly."""
    from tests.test_dense_reference import numpy_cart, numpy_r2m, numpy_tsv

    reference = {"r2m": numpy_r2m, "tsv": numpy_tsv, "cart": numpy_cart}[method]
    base_dir, adapters, dense = hand_sized_adapters(tmp_path, ranks)
    base = load_file(base_dir / "model.safetensors")
    want = reference(base, dense, **options)
    matrices = ("layer.weight", "other.weight")  # R²M's core set S: every tensor of >= 2 dims
    tau = torch.stack([torch.cat([(e[n] - base[n]).reshape(-1) for n in matrices]) for e in dense])
    # From the factors: each matrix's base read once by the write pass, no expert densified
    # (3 more times its bytes); the vector's 4 inputs by each pass that reads it.
    matrix_bytes = sum(base[n].numel() * 8 for n in matrices)
    vector_reads = 2 if method == "r2m" else 1  # R²M: its truncation and write passes
    for svd in ("exact", "randomized"):
        report: dict = {}
        got = tensors_in(
            r2m_ext.merge_files(
                base_dir,
                adapters,
                tmp_path / svd,
                method,
                svd=svd,
                compute_dtype="float64",
                report=report,
                **options,
            )
        )
        for name, value in want.items():
            assert relative_error(got[name], torch.from_numpy(value)) <= 1e-10, (svd, name)
        read = sum(p["input_bytes_read"] for p in report["io_bytes"].values())
        assert read == matrix_bytes + vector_reads * 4 * 9 * 8
        if method == "r2m":
            gram = torch.tensor(report["gram"], dtype=torch.float64)
            assert relative_error(gram, tau @ tau.T) <= 1e-12
            assert all(report["tensors"][n].get("factored") for n in matrices)
