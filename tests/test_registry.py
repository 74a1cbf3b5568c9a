"""The method registry: a method in one file of its own (here a toy, outside the package, found
through the r2m_ext.methods entry-point group) gets its CLI flag, Python keyword, recipe entry
and --help line without any other module changing."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from conftest import make_experts, random_model
from safetensors.torch import load_file, save_file

from r2m_ext.methods import registry
from r2m_ext.methods.registry import MergeMethod, Range, option
from r2m_ext.options import ENGINE_FIELDS, resolve_options

TOY_METHOD = '''
"""toy: theta_0 + toy_scale * mean_i tau_i (a method defined outside r2m_ext)."""

from dataclasses import dataclass

from r2m_ext.methods.common import mean_update
from r2m_ext.methods.passes import MethodPasses
from r2m_ext.methods.registry import MergeMethod, Range, option, register


@dataclass(frozen=True)
class ToyOptions:
    toy_scale: float = option(0.5, "scale of the mean update", check=Range(0, 10))


def merge_toy(tensors, options, report):
    return MethodPasses("toy", lambda entry: mean_update(tensors, entry, options.toy_scale))


register(
    MergeMethod(
        name="toy", summary="a scaled mean", options=ToyOptions, merge=merge_toy, passes=("merge",)
    )
)
'''

API_SCRIPT = """
import sys
import r2m_ext
from safetensors.torch import load_file, save_file

base, *experts = [load_file(p) for p in sys.argv[2:]]
save_file(r2m_ext.merge(base, experts, "toy", toy_scale=0.25), sys.argv[1])
"""


@pytest.fixture(scope="module")
def toy_plugin(tmp_path_factory):
    """A directory that, on PYTHONPATH, holds the toy method's module and the distribution
    metadata naming it as an entry point (what `pip install` of a plugin leaves)."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "r2m_toy_method.py").write_text(TOY_METHOD)
    info = root / "r2m_toy-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: r2m-toy\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[r2m_ext.methods]\ntoy = r2m_toy_method\n")
    return root


def run_with_plugin(plugin, *args):
    env = dict(os.environ, PYTHONPATH=str(plugin))
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("inputs")
    base = random_model(0)
    paths = []
    for index, state in enumerate([base, *make_experts(base, 2)]):
        path = directory / f"model{index}.safetensors"
        save_file(state, str(path))
        paths.append(path)
    return base, make_experts(base, 2), paths


def toy_oracle(base, experts, scale):
    """theta_0 + scale * mean_i tau_i in float64 (heads averaged, integers copied: spec §4)."""
    want = {}
    for name, value in base.items():
        if not value.is_floating_point():
            want[name] = value
        elif name.startswith("head."):
            want[name] = torch.stack([e[name].double() for e in experts]).mean(0)
        else:
            tau = torch.stack([e[name].double() - value.double() for e in experts])
            want[name] = value.double() + scale * tau.mean(0)
    return want


def assert_matches_oracle(got, want):
    assert set(got) == set(want)
    for name, value in want.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[name].double(), value, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got[name], value)


def test_a_method_in_one_file_runs_through_cli_recipe_and_api(toy_plugin, inputs, tmp_path):
    base, experts, (base_path, *expert_paths) = inputs
    experts_args = [a for p in expert_paths for a in ("--expert", p)]
    merge = ["-m", "r2m_ext", "merge", "--base", base_path, *experts_args, "--method", "toy"]

    help_text = run_with_plugin(toy_plugin, "-m", "r2m_ext", "merge", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "--toy-scale" in help_text.stdout and "toy: scale of the mean update" in help_text.stdout

    out = tmp_path / "cli"
    result = run_with_plugin(toy_plugin, *merge, "--toy-scale", "0.25", "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    got = {}
    for shard in sorted(out.glob("*.safetensors")):
        got.update(load_file(str(shard)))
    assert_matches_oracle(got, toy_oracle(base, experts, 0.25))

    recipe = yaml.safe_load((out / "r2m_recipe.yaml").read_text())
    assert recipe["method"] == "toy" and recipe["options"]["toy_scale"] == 0.25
    again = tmp_path / "from_recipe"
    result = run_with_plugin(
        toy_plugin, "-m", "r2m_ext", "merge", "--config", out / "r2m_recipe.yaml", "--out", again
    )
    assert result.returncode == 0, result.stderr
    for shard in out.glob("*.safetensors"):
        assert (again / shard.name).read_bytes() == shard.read_bytes()

    api_out = tmp_path / "api.safetensors"
    result = run_with_plugin(toy_plugin, "-c", API_SCRIPT, api_out, base_path, *expert_paths)
    assert result.returncode == 0, result.stderr
    assert_matches_oracle(load_file(str(api_out)), toy_oracle(base, experts, 0.25))

    # The option's declared range is enforced like a built-in one's, by name.
    result = run_with_plugin(toy_plugin, *merge, "--toy-scale", "11", "--out", tmp_path / "bad")
    assert result.returncode == 1
    assert "option toy_scale: 11.0 must be in [0, 10]" in result.stderr
    assert not (tmp_path / "bad").exists()
    # Its option belongs to it alone.
    result = run_with_plugin(
        toy_plugin, *merge[:-1], "average", "--toy-scale", "1", "--out", tmp_path / "bad"
    )
    assert result.returncode == 1 and "do not apply to method 'average'" in result.stderr


@dataclasses.dataclass(frozen=True)
class _IntLam:
    lam: int = option(1, "an integer lam, unlike every built-in lam")


@dataclasses.dataclass(frozen=True)
class _TakesDevice:
    device: str = option("cpu", "a name merge_files already has")


@dataclasses.dataclass(frozen=True)
class _TakesEngineOption:
    compute_dtype: str = option("float32", "an engine option")


def _method(name, options):
    return MergeMethod(name=name, summary="", options=options, merge=None, passes=())


@pytest.mark.parametrize(
    "method, message",
    [
        (_method("average", _IntLam), "registered twice"),
        (_method("int_lam", _IntLam), "'lam' differs in type or range"),
        (_method("takes_device", _TakesDevice), "taken by r2m_ext.merge"),
        (_method("takes_engine", _TakesEngineOption), "taken by the engine's options"),
    ],
)
def test_a_method_that_would_break_another_is_refused(method, message):
    registry.method_names()  # the built-in methods are registered
    with pytest.raises(ValueError, match=message):
        registry.register(method)
    assert registry.get_method(method.name) is None or method.name == "average"


def test_every_declared_default_is_a_value_its_own_checks_accept():
    for name, declared_by in registry.method_options().items():
        for label, declared in {**declared_by, "engine": ENGINE_FIELDS.get(name)}.items():
            if declared is None or declared.default is None:
                continue
            meta = declared.metadata
            assert isinstance(declared.default, meta["kind"]), (label, name)
            assert meta["choices"] is None or declared.default in meta["choices"], (label, name)
            assert meta["check"] is None or meta["check"](declared.default), (label, name)


def test_variants_pick_their_options_by_the_selector():
    plain = resolve_options("dare")
    with_ties = resolve_options("dare", dare_combine="ties")
    assert plain.lam == 0.3 and not hasattr(plain.method_options, "density")
    assert (with_ties.lam, with_ties.density, with_ties.ties_scope) == (1.0, 0.2, "global")
    assert json.dumps(with_ties.to_dict())  # the recipe's form is plain data


@pytest.mark.parametrize(
    "check, inside, outside, text",
    [
        (Range(1), [1, 7], [0, -3], ">= 1"),
        (Range(0, 1, low_open=True), [1e-9, 1], [0, 1.5], "in (0, 1]"),
        (Range(0, 2**64, high_open=True), [0, 2**64 - 1], [-1, 2**64], "in [0, 2**64)"),
    ],
)
def test_ranges_accept_and_describe_their_bounds(check, inside, outside, text):
    assert all(check(v) for v in inside) and not any(check(v) for v in outside)
    assert check.text == text


def test_merge_imports_no_detector_code():
    script = textwrap.dedent(
        """
        import sys
        from r2m_ext import cli
        cli.build_parser()
        print(sorted(m for m in sys.modules if m.startswith("r2m_ext.detect.")))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_new_kind_of_input_is_one_registered_reader(monkeypatch, tmp_path):
    """A model stored as a NumPy archive, read through a registered SourceFormat: the engine
    reads it through the TensorSource interface alone, beside ordinary checkpoints, and the
    merge equals the in-memory one; its NaN error names the archive."""
    import numpy as np

    import r2m_ext
    from r2m_ext.io import source

    monkeypatch.setattr(source, "_FORMATS", list(source._FORMATS))

    class NpzSource(source.StateDictSource):
        def __init__(self, path, **options):
            arrays = np.load(path / "weights.npz")
            super().__init__({k: torch.from_numpy(arrays[k]) for k in arrays.files}, str(path))
            self.files = self.files_read = [path / "weights.npz"]

        def where(self, name):
            return str(self.files[0])

    source.register_source_format(
        source.SourceFormat("npz", lambda path: (path / "weights.npz").is_file(), NpzSource)
    )
    base = random_model(0)
    experts = make_experts(base, 2)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(experts[0], str(tmp_path / "e0.safetensors"))
    archive = tmp_path / "e1"
    archive.mkdir()
    np.savez(archive / "weights.npz", **{k: v.numpy() for k, v in experts[1].items()})

    out = r2m_ext.merge_files(
        tmp_path / "base.safetensors", [tmp_path / "e0.safetensors", archive], tmp_path / "out"
    )
    want = r2m_ext.merge(base, experts)
    got = load_file(str(next(out.glob("*.safetensors"))))
    assert set(got) == set(want)
    assert all(torch.equal(got[name], want[name]) for name in want)

    experts[1]["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    np.savez(archive / "weights.npz", **{k: v.numpy() for k, v in experts[1].items()})
    with pytest.raises(r2m_ext.R2MError, match=r"weights\.npz contains NaN or Inf"):
        r2m_ext.merge_files(
            tmp_path / "base.safetensors", [tmp_path / "e0.safetensors", archive], tmp_path / "o2"
        )


def _method_passes(method, base, experts, **given):
    from r2m_ext.engine import MemoryBudget, MergeInputs
    from r2m_ext.io import StateDictSource
    from r2m_ext.methods.registry import get_method
    from r2m_ext.plan import plan_merge

    options = resolve_options(method, **given)
    sources = [StateDictSource(base, "base")]
    sources += [StateDictSource(e, f"expert {i}") for i, e in enumerate(experts)]
    plan = plan_merge(sources, options)
    inputs = MergeInputs(plan, sources, options, MemoryBudget(1 << 30))
    report: dict = {}
    return plan, get_method(method).merge(inputs, options.method_options, report), report


def _shared_out(statistic_pass, ranks):
    """What ranks would do: each observes its share (every ranks-th tensor), the observations are
    gathered and folded in the plan's order; exact statistics may instead be folded per rank
    and the rank totals combined."""
    observed = {}
    for rank in range(ranks):
        for entry in statistic_pass.tensors[rank::ranks]:
            observed[entry.name] = statistic_pass.observe(entry)
    if statistic_pass.exact:
        totals = []
        for rank in range(ranks):
            total = statistic_pass.start
            for entry in statistic_pass.tensors[rank::ranks]:
                total = statistic_pass.combine(total, observed[entry.name])
            totals.append(total)
        total = statistic_pass.start
        for part in reversed(totals):  # any grouping, any order
            total = statistic_pass.combine(total, part)
        return statistic_pass.finish(total)
    total = statistic_pass.start
    for entry in statistic_pass.tensors:
        total = statistic_pass.combine(total, observed[entry.name])
    statistic_pass.finish(total)


@pytest.mark.parametrize(
    "method, given", [("r2m", {}), ("ties", {}), ("dare", {"dare_combine": "ties"})]
)
def test_statistic_passes_reduce_to_the_same_bits_however_tensors_are_shared(method, given):
    """Each statistic pass on its own: observed on one process in plan order, or in shares as
    ranks would, its reduction is bitwise the same, and so is every merged tensor."""
    base = random_model(0)
    experts = make_experts(base, 3)
    merged = {}
    for ranks in (1, 3):
        plan, work, report = _method_passes(method, base, experts, **given)
        for statistic_pass in work.statistics:
            _shared_out(statistic_pass, ranks)
        merged[ranks] = {
            entry.name: torch.cat([values for _, _, values in work.emit(entry)])
            for entry in plan.body
        }
        if method == "r2m":
            merged[ranks]["eta"] = torch.tensor(report["eta"], dtype=torch.float64)
            merged[ranks]["gram"] = torch.tensor(report["gram"], dtype=torch.float64)
    assert merged[1].keys() == merged[3].keys()
    assert all(torch.equal(merged[1][k], merged[3][k]) for k in merged[1])
    if method == "r2m":  # the reduced Gram against float64 task vectors on the core set S
        core = [e.name for e in plan.body if e.in_core_set]
        tau = torch.stack(
            [
                torch.cat([(x[n].double() - base[n].double()).reshape(-1) for n in core])
                for x in experts
            ]
        )
        torch.testing.assert_close(merged[1]["gram"], tau @ tau.T, rtol=1e-6, atol=1e-9)
