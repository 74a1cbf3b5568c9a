"""r2m_ext installed with pip as the README tells a newcomer, not through make: a fresh virtual
environment with the pinned CPU torch, a clean copy of the sources, a wheel built from them
and installed, the documented `pip install --no-build-isolation .`, and then the package used
from another directory: `r2m --version`, `r2m merge` on tiny checkpoints (compared with this
checkout's merge), and the import. About two minutes, most of it the compile."""

import os
import subprocess
import venv

import pytest
import torch
from checkpoints import save_single
from conftest import REPO, make_experts, random_model
from safetensors.torch import load_file

import r2m_ext

TORCH_RELEASE = torch.__version__.split("+")[0]


def _run(*command, cwd=None, timeout=600):
    # PYTHONPATH would let the venv import this checkout instead of what pip installed.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    result = subprocess.run(
        [str(c) for c in command],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )
    return result


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _source_copy(destination):
    """The files git would check out (tracked, and new ones not ignored), without build output."""
    listed = _run("git", "ls-files", "-co", "--exclude-standard", "-z", cwd=REPO)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    return destination


def test_pip_installs_a_working_package_without_make(tmp_path):
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python, pip = environment / "bin" / "python", [environment / "bin" / "python", "-m", "pip"]
    # As the README says: a venv of Python 3.12+ comes without setuptools, which the build needs.
    _ok(_run(*pip, "install", "-q", f"torch=={TORCH_RELEASE}", "setuptools"))
    source = _source_copy(tmp_path / "src")

    # With build isolation the build cannot see torch: one clear message, not a traceback.
    isolated = _run(*pip, "install", source)
    assert isolated.returncode != 0
    assert "pip install --no-build-isolation ." in isolated.stdout + isolated.stderr

    dist = tmp_path / "dist"
    _ok(_run(*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", dist, source))
    (wheel,) = dist.glob("r2m_ext-*.whl")
    _ok(_run(*pip, "install", "-q", wheel))
    requirements = _ok(
        _run(python, "-c", "import importlib.metadata as m; print(m.requires('r2m_ext'))")
    ).stdout
    for requirement in (f"torch=={TORCH_RELEASE}", "numpy", "safetensors", "pyyaml", "tqdm"):
        assert requirement in requirements, requirements
    assert "matplotlib" in requirements and 'extra == "plots"' in requirements

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    base = random_model(0)
    experts = make_experts(base, 2)
    base_path = save_single(base, elsewhere / "base.safetensors")
    paths = [save_single(e, elsewhere / f"e{i}.safetensors") for i, e in enumerate(experts)]

    def check_installed_package(out_name):
        version = _ok(_run(environment / "bin" / "r2m", "--version", cwd=elsewhere)).stdout
        assert f"r2m_ext {r2m_ext.__version__}: native backend" in version, version
        assert f"built against torch {torch.__version__}" in version, version
        assert f"running with torch {torch.__version__}" in version, version
        imported = _ok(
            _run(
                python,
                "-c",
                "import r2m_ext; print(r2m_ext.__file__); print(r2m_ext.backend_info())",
                cwd=elsewhere,
            )
        ).stdout
        assert str(environment) in imported.splitlines()[0] and "native backend" in imported
        arguments = ["merge", "--base", base_path, "--out", out_name, "--quiet"]
        arguments += [part for path in paths for part in ("--expert", path)]
        _ok(_run(environment / "bin" / "r2m", *arguments, cwd=elsewhere))
        merged = load_file(elsewhere / out_name / "model.safetensors")
        want = r2m_ext.merge(base, experts)
        assert merged.keys() == want.keys()
        for name in want:
            assert torch.equal(merged[name], want[name]), name

    check_installed_package("merged_from_wheel")
    # The install command the README gives; the compiled objects of the wheel build are reused.
    _ok(
        _run(
            *pip, "install", "-q", "--no-build-isolation", "--force-reinstall", "--no-deps", source
        )
    )
    check_installed_package("merged_from_pip_install")
