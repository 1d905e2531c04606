"""Builds the CUDA extension ``vllm_w4a8_fastprep._C`` from ``csrc/``.

The ops use only PyTorch's stable ABI (``STABLE_TORCH_LIBRARY``), compiled
with ``TORCH_TARGET_VERSION`` = torch 2.11.0 (the oldest torch supported), so
any use of an API outside the stable ABI of 2.11 fails at build time. The
extension is a ``py_limited_api`` (abi3) build: one wheel,
``vllm_w4a8_fastprep-*-cp310-abi3-linux_x86_64.whl``, serves every Python >=
3.10. Kernels are compiled for Hopper (sm_90a) with a compute_90 PTX fallback.

Building needs nvcc (the CUDA 13.0 toolkit). A machine without one installs
a wheel built elsewhere with ``python -m pip wheel --no-deps
--no-build-isolation .``.
"""

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup
from setuptools.command.sdist import sdist

ROOT = Path(__file__).parent

# setup.py commands that compile the extension (PEP 517 builds run
# bdist_wheel / editable_wheel; metadata and sdist steps do not compile).
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install", "bdist_egg"}

# torch 2.11.0 in the stable ABI's version format (major << 56 | minor << 48),
# see torch/csrc/stable/version.h.
TORCH_TARGET_VERSION = "0x020B000000000000"

NO_NVCC_MESSAGE = """
vllm-w4a8-fastprep: building the CUDA extension needs nvcc from the CUDA 13.0
toolkit, and none was found ({looked}).

Either
  * install the CUDA 13.0 toolkit and point CUDA_HOME at it, e.g.
        CUDA_HOME=/usr/local/cuda-13.0 pip install --no-build-isolation --no-deps .
  * or build the wheel once on a machine that has nvcc (any Python >= 3.10,
    torch 2.11.0):
        python -m pip wheel --no-deps --no-build-isolation . -w dist
    and install that wheel here (it needs no compiler):
        python -m pip install dist/vllm_w4a8_fastprep-*-cp310-abi3-linux_x86_64.whl
"""


def _find_cuda_home() -> None:
    # torch's build helper wants CUDA_HOME; find the toolkit that holds nvcc
    # (nvcc on PATH may be a wrapper script outside the toolkit).
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        libs = [p for d in ("lib64", "lib") for p in (home / d).glob("libcudart.so*")]
        if (home / "bin" / "nvcc").exists() and libs:
            os.environ["CUDA_HOME"] = str(home)
            return


def _toolkit_problem() -> str | None:
    """None when nvcc and a CUDA build of torch are at hand, else what is missing."""
    import torch
    from torch.utils import cpp_extension

    if not torch.version.cuda:
        return (
            f"\nvllm-w4a8-fastprep: torch {torch.__version__} is a CPU-only build; the CUDA "
            "extension needs the CUDA build of torch 2.11.0 (PyPI's default, CUDA 13.0).\n"
        )
    home = cpp_extension.CUDA_HOME
    if home and (Path(home) / "bin" / "nvcc").exists():
        return None
    looked = (
        f"expected at {Path(home) / 'bin' / 'nvcc'}"
        if home
        else "CUDA_HOME and CUDA_PATH are unset, no nvcc is on PATH, no /usr/local/cuda"
    )
    return NO_NVCC_MESSAGE.format(looked=looked)


_find_cuda_home()
_building = any(arg in BUILD_COMMANDS for arg in sys.argv[1:])
_problem = _toolkit_problem()
if _problem and _building:
    sys.exit(_problem)

from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # noqa: E402

COMMON_FLAGS = [
    "-O3",
    "-std=c++17",
    "-DUSE_CUDA",  # exposes aoti_torch_get_current_cuda_stream in the shim
    f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}",  # stable ABI of 2.11 only
]
NVCC_FLAGS = COMMON_FLAGS + [
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
    "--expt-relaxed-constexpr",
]
if os.environ.get("W4A8_FASTPREP_PTXAS_VERBOSE") == "1":
    NVCC_FLAGS.append("-Xptxas=-v")  # register / spill report in the build log
# Limited-API build: keep any C-API use to Python 3.10's stable subset.
CXX_FLAGS = COMMON_FLAGS + ["-DPy_LIMITED_API=0x030A0000"]


class BuildExt(BuildExtension):
    """torch's BuildExtension with one fixed object folder under build/, so an
    editable install, ``setup.py build_ext --inplace`` and ``pip wheel`` reuse
    each other's compiled objects (ninja rebuilds only what changed)."""

    def finalize_options(self):
        super().finalize_options()
        plat = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        self.build_temp = str(ROOT / "build" / f"temp.{plat}")


sources = sorted(
    str(p.relative_to(ROOT)) for ext in ("*.cpp", "*.cu") for p in (ROOT / "csrc").glob(ext)
)


class Sdist(sdist):
    """The source archive carries all of csrc/ (the headers too), also where
    no toolkit is found and so no extension is defined."""

    def make_distribution(self):
        self.filelist.extend(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").iterdir()
                             if p.is_file())
        self.filelist.sort()
        self.filelist.remove_duplicates()
        super().make_distribution()

# Without a toolkit only metadata / sdist commands get here: no extension.
ext_modules = (
    []
    if _problem
    else [
        CUDAExtension(
            name="vllm_w4a8_fastprep._C",
            sources=sources,
            include_dirs=[str(ROOT / "csrc")],
            py_limited_api=True,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        )
    ]
)

# The package metadata setuptools writes while building (the .egg-info folder)
# goes under build/, not next to the package: `python -m pytest` and
# `python -m vllm_w4a8_fastprep` run from the checkout put it first on
# sys.path, where a stale or half-written copy would be what importlib finds
# (vLLM's plugin entry point, the console script) while a build rewrites it.
(ROOT / "build").mkdir(exist_ok=True)
setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True), "sdist": Sdist},
    options={"bdist_wheel": {"py_limited_api": "cp310"}, "egg_info": {"egg_base": "build"}},
)
