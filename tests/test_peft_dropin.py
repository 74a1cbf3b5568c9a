"""r2m_ext.peft.add_weighted_adapter against PEFT's own add_weighted_adapter (peft 0.21.2) on
one PeftModel holding three adapters of different ranks (linear layers and an embedding): the
new adapter's merged delta per module equals PEFT's (the factors themselves may differ by the
sign and rotation of singular vectors)."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from r2m_ext.peft import add_weighted_adapter, factored_truncated_svd  # noqa: E402
from tests.conftest import relative_error  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> PeftModel:
    root = tmp_path_factory.mktemp("peft_dropin")
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    configs = {
        "a": LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "embed_tokens"],
            init_lora_weights=False,
        ),
        "b": LoraConfig(
            r=8,
            lora_alpha=4,
            target_modules=["q_proj", "v_proj", "embed_tokens"],
            init_lora_weights=False,
            use_rslora=True,
        ),
        "c": LoraConfig(
            r=2,
            lora_alpha=2,
            target_modules=["q_proj", "v_proj", "embed_tokens"],
            init_lora_weights=False,
        ),
    }
    for seed, (name, lora_config) in enumerate(configs.items(), start=1):
        torch.manual_seed(seed)
        get_peft_model(
            LlamaForCausalLM.from_pretrained(root / "base"), lora_config
        ).save_pretrained(root / name)
    combined = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(root / "base"), root / "a", adapter_name="a"
    )
    combined.load_adapter(root / "b", adapter_name="b")
    combined.load_adapter(root / "c", adapter_name="c")
    return combined


def deltas(model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {
        name: module.get_delta_weight(adapter)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.scaling
    }


@pytest.mark.parametrize("svd_rank", [None, 3, 14, 20])  # largest rank; cut; all 14; padded
def test_svd_combination_equals_peft_s(model, svd_rank):
    theirs, ours = copy.deepcopy(model), copy.deepcopy(model)
    arguments = (["a", "b", "c"], [0.7, -0.4, 1.3], "merged")
    theirs.add_weighted_adapter(*arguments, combination_type="svd", svd_rank=svd_rank)
    add_weighted_adapter(ours, *arguments, combination_type="svd", svd_rank=svd_rank)
    assert ours.peft_config["merged"] == theirs.peft_config["merged"]
    want, got = deltas(theirs, "merged"), deltas(ours, "merged")
    assert sorted(got) == sorted(want) and any("embed_tokens" in n for n in want)
    for name in want:
        assert relative_error(got[name], want[name]) < 1e-5, name


def test_clamp_and_other_combinations(model):
    ours = copy.deepcopy(model)
    add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "clamped", svd_rank=6, svd_clamp=0.9)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["clamped"].weight, layer.lora_B["clamped"].weight
    high = max(a.abs().max(), b.abs().max())
    assert torch.isclose(a.max().abs(), high) or torch.isclose(b.max().abs(), high)
    # The dense combinations are PEFT's own.
    theirs = copy.deepcopy(model)
    add_weighted_adapter(ours, ["a", "b"], [0.5, 0.5], "joined", combination_type="cat")
    theirs.add_weighted_adapter(["a", "b"], [0.5, 0.5], "joined", combination_type="cat")
    for name, value in deltas(theirs, "joined").items():
        assert torch.equal(deltas(ours, "joined")[name], value)


def test_factored_svd_by_hand():
    """Rank-2 product with singular values 3 and 2 (orthonormal factors by construction)."""
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    left, right = u * torch.tensor([3.0, 2.0], dtype=torch.float64), v.T
    got_u, got_s, got_vh = factored_truncated_svd(left, right, 3)
    assert torch.allclose(got_s, torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64))
    assert torch.allclose((got_u * got_s) @ got_vh, left @ right)
    top_u, top_s, top_vh = factored_truncated_svd(left, right, 1)
    want = torch.zeros(3, 4, dtype=torch.float64)
    want[0, 1] = 3.0
    assert torch.allclose((top_u * top_s) @ top_vh, want)
