"""r2m_ext's algorithms inside FusionBench (fusion-bench 0.2.33, real), on a small in-memory
model pool: TSV-M against FusionBench's own TaskSingularVectorMerging, the Hydra configs
through `_target_`, options validated by r2m_ext."""

import copy

import pytest
import torch
from torch import nn

import r2m_ext
from r2m_ext.errors import R2MError
from tests.conftest import relative_error

fusion_bench = pytest.importorskip("fusion_bench")
from fusion_bench import BaseModelPool  # noqa: E402
from fusion_bench.method import TaskSingularVectorMerging as FusionBenchTSVM  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from r2m_ext.integrations.fusion_bench import (  # noqa: E402
    CONFIG_DIR,
    CARTMerging,
    R2MMerging,
    TaskSingularVectorMerging,
)


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 40), nn.LayerNorm(40))


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = small_model()
    found = {"_pretrained_": base}
    for i in (1, 2, 3):
        model = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        found[f"task{i}"] = model
    return found


def pool_of(models) -> BaseModelPool:
    """A fresh pool: FusionBench's algorithms change the pretrained model in place."""
    return BaseModelPool(models={name: copy.deepcopy(m) for name, m in models.items()})


def state_dicts(models):
    base = models["_pretrained_"].state_dict()
    return base, [models[f"task{i}"].state_dict() for i in (1, 2, 3)]


def test_tsv_equals_fusion_benchs_own(models):
    theirs = FusionBenchTSVM().run(pool_of(models)).state_dict()
    ours = TaskSingularVectorMerging(svd="exact").run(pool_of(models)).state_dict()
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert relative_error(ours[name], theirs[name]) < 1e-5, name


def test_hydra_configs_instantiate_and_run(models):
    base, experts = state_dicts(models)
    for method, overrides, extra in (
        ("tsv", {"svd": "exact"}, {"head_patterns": (), "exclude_truncation": ()}),
        ("cart", {}, {"head_patterns": (), "exclude_truncation": ()}),
        ("r2m", {}, {}),
    ):
        config = OmegaConf.load(CONFIG_DIR / "method" / "r2m_ext" / f"{method}.yaml")
        algorithm = instantiate(config, **overrides)
        merged = algorithm.run(pool_of(models)).state_dict()
        options = {k: v for k, v in OmegaConf.to_container(config).items() if k[0] != "_"}
        options.pop("exclude_keys")
        want = r2m_ext.merge(base, experts, method, **{**options, **overrides, **extra})
        for name in want:
            assert torch.equal(merged[name], want[name]), (method, name)


def test_r2m_reports_what_it_computed(models):
    algorithm = R2MMerging(alpha=0.5)
    algorithm.run(pool_of(models))
    assert len(algorithm.report["core_coefficients"]) == 3 and algorithm.report["eta"] > 0


def test_exclude_keys_keep_a_matrix_out_of_the_svd(models):
    """CART on an excluded matrix is theta_avg (the spec's untruncated case)."""
    base, experts = state_dicts(models)
    merged = CARTMerging(exclude_keys=["2.weight"], rank_ratio=0.1).run(pool_of(models))
    average = torch.stack([e["2.weight"] for e in experts]).mean(0)
    assert relative_error(merged.state_dict()["2.weight"], average) < 1e-6
    factored = merged.state_dict()["0.weight"]
    assert relative_error(factored, torch.stack([e["0.weight"] for e in experts]).mean(0)) > 1e-3


def test_bad_options_are_refused_before_any_model_loads():
    with pytest.raises(R2MError, match="svd"):
        TaskSingularVectorMerging(svd="fast")
    with pytest.raises(R2MError, match="rank_ratio"):
        CARTMerging(rank_ratio=2.0)
    with pytest.raises(R2MError, match="density"):
        R2MMerging(density=0.3)
