"""Builds r2m_ext and its one extension, r2m_ext._C.

The extension is compiled against the torch it will run with, so the build must see that torch:
install torch first, then `pip install --no-build-isolation .` (an isolated build hides it, and
a torch fetched into one could differ from the one installed). The wheel requires exactly the
torch release it was built against.

CPU kernels are always built. The CUDA kernels are added when torch was built with CUDA and nvcc
is found; R2M_FORCE_CUDA=1 requires them (an error if impossible), R2M_NO_CUDA=1 leaves them out.
Without a visible GPU, TORCH_CUDA_ARCH_LIST defaults to 9.0 (H100/H200).
"""

import os
import re
import shutil
from pathlib import Path

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    raise SystemExit(
        "r2m_ext is a PyTorch extension compiled against the torch it will run with, and this "
        "build cannot import torch. Install torch first (pip install torch==2.13.0, or your CUDA "
        "build), then build without isolation, which would hide it: "
        "pip install --no-build-isolation ."
    ) from None

ROOT = Path(__file__).resolve().parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (ROOT / "r2m_ext" / "_version.py").read_text()
).group(1)


def _relative(paths):
    return sorted(str(p.relative_to(ROOT)) for p in paths)


def _build_with_cuda() -> bool:
    forced = os.environ.get("R2M_FORCE_CUDA") == "1"
    if os.environ.get("R2M_NO_CUDA") == "1":
        if forced:
            raise SystemExit("setup.py: R2M_FORCE_CUDA=1 and R2M_NO_CUDA=1 contradict each other")
        return False
    nvcc_found = CUDA_HOME is not None or shutil.which("nvcc") is not None
    possible = torch.version.cuda is not None and nvcc_found
    if forced and not possible:
        raise SystemExit(
            "setup.py: R2M_FORCE_CUDA=1 but "
            + ("this torch has no CUDA" if torch.version.cuda is None else "nvcc was not found")
            + f" (torch {torch.__version__}, CUDA_HOME={CUDA_HOME})"
        )
    return possible


def _extension():
    with_cuda = _build_with_cuda()
    cpu_sources = list((ROOT / "csrc").rglob("*_cpu.cpp")) + [
        p for p in (ROOT / "python").rglob("*.cpp") if not p.name.endswith("_cuda.cpp")
    ]
    # -fopenmp: at::parallel_for is inlined into our code and runs its loop on one thread unless
    # this translation unit is compiled with OpenMP (torch's own libgomp serves it at run time).
    # -ffp-contract=off: the kernels' AVX2/AVX-512 clones give the baseline build's bits
    # (csrc/common/cpu_clones.h).
    cxx_flags = [
        "-O3",
        "-fopenmp",
        "-ffp-contract=off",
        f'-DR2M_TORCH_VERSION="{torch.__version__}"',
    ]
    link_flags = ["-fopenmp"]
    include_dirs = [str(ROOT / "csrc"), str(ROOT / "python")]
    if not with_cuda:
        return CppExtension(
            "r2m_ext._C",
            _relative(cpu_sources),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    cuda_sources = list((ROOT / "csrc").rglob("*.cu")) + list((ROOT / "python").rglob("*_cuda.cpp"))
    return CUDAExtension(
        "r2m_ext._C",
        _relative(cpu_sources + cuda_sources),
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": cxx_flags + ["-DR2M_WITH_CUDA"],
            "nvcc": ["-O3", "-DR2M_WITH_CUDA", "--expt-relaxed-constexpr"],
        },
        extra_link_args=link_flags,
    )


setup(
    name="r2m_ext",
    version=VERSION,
    description="Real-aware Residual Model Merging (R²M) and baselines as a PyTorch extension",
    packages=find_packages(include=["r2m_ext", "r2m_ext.*"]),
    # FusionBench's Hydra configs of r2m_ext's algorithms (fusion_bench --config-dir).
    package_data={"r2m_ext.integrations": ["fusion_bench_config/method/r2m_ext/*.yaml"]},
    python_requires=">=3.11",
    # The extension's ABI is that of the torch release it was compiled against.
    install_requires=[
        f"torch=={torch.__version__.split('+')[0]}",
        "numpy",
        "safetensors>=0.4",
        "pyyaml",
        "tqdm",
    ],
    # The tools r2m_ext plugs into (integrations/, r2m_ext.peft), at the versions it is tested with.
    extras_require={
        "plots": ["matplotlib"],
        "mergekit": ["mergekit==0.1.5"],
        "fusion-bench": ["fusion-bench==0.2.33"],
        "peft": ["peft==0.21.2"],
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    entry_points={"console_scripts": ["r2m = r2m_ext.cli:run"]},
)
