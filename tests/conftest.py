import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# A shell starts background jobs with SIGINT ignored, and children inherit an ignored signal,
# so the CLI's Ctrl-C tests (a real SIGINT) would see no KeyboardInterrupt. A handled signal is
# reset to its default in a child: handling it here lets every CLI subprocess be interrupted.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def random_model(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A small ViT-like state dict: matrices, an excluded embedding, 1-D norms/biases, a conv,
    a head, and an integer buffer."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return {
        "patch_embed.proj.weight": rand(16, 3, 2, 2),
        "pos_embed": rand(5, 16),
        "blocks.0.attn.qkv.weight": rand(48, 16),
        "blocks.0.attn.qkv.bias": rand(48),
        "blocks.0.mlp.fc1.weight": rand(32, 16),
        "blocks.0.norm1.weight": rand(16),
        "blocks.1.mlp.fc2.weight": rand(16, 32),
        "blocks.1.proj.weight": rand(1, 16),
        "head.weight": rand(2, 16),
        "head.bias": rand(2),
        "num_batches_tracked": torch.tensor(5, dtype=torch.int64),
    }


def make_experts(base, n: int, seed: int = 1, scale: float = 0.1, shared: float = 1.0):
    """Experts = base + a shared update + a task-specific low-rank-plus-noise update."""
    g = torch.Generator().manual_seed(seed)
    common = {
        k: torch.randn(v.shape, generator=g, dtype=torch.float64)
        for k, v in base.items()
        if v.is_floating_point()
    }
    experts = []
    for _ in range(n):
        expert = {}
        for name, value in base.items():
            if not value.is_floating_point():
                expert[name] = value.clone()
                continue
            own = torch.randn(value.shape, generator=g, dtype=torch.float64)
            if value.dim() == 2 and min(value.shape) >= 2:
                left = torch.randn(value.shape[0], 2, generator=g, dtype=torch.float64)
                right = torch.randn(2, value.shape[1], generator=g, dtype=torch.float64)
                own = 0.2 * own + 3 * left @ right / value.shape[1] ** 0.5
            update = scale * (shared * common[name] + own)
            expert[name] = (value.double() + update).to(value.dtype)
        experts.append(expert)
    return experts


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    scale = want.norm()
    return float((got - want).norm() / scale) if scale > 0 else float((got - want).norm())


def run_cli(*args, cwd=None, preexec_fn=None) -> subprocess.CompletedProcess:
    """The real `r2m` command in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "r2m_ext", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        preexec_fn=preexec_fn,
        timeout=300,
    )


def run_main(*args) -> subprocess.CompletedProcess:
    """The `r2m` command's `main` in this process, as `run_cli` runs it in another (no interpreter
    start-up, 1.5 s with torch): for the many cases of one error path. An exception, which the
    command would print as a traceback, escapes."""
    from r2m_ext import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    handler = signal.getsignal(signal.SIGTERM)  # main installs its own
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = cli.main([str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, handler)
    return subprocess.CompletedProcess(args, status, stdout.getvalue(), stderr.getvalue())


@pytest.fixture
def toy():
    base = random_model(0)
    return base, make_experts(base, 3)
