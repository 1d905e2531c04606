"""Builds the CUDA extension ``vllm_w4a8_fastprep._C`` from ``csrc/``.

The ops use only PyTorch's stable ABI (``STABLE_TORCH_LIBRARY``), so the
extension is a ``py_limited_api`` (abi3) build. Kernels are compiled for
Hopper (sm_90a) with a compute_90 PTX fallback.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


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


_find_cuda_home()

from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # noqa: E402

NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "-DUSE_CUDA",  # exposes aoti_torch_get_current_cuda_stream in the shim
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
    "--expt-relaxed-constexpr",
]
if os.environ.get("W4A8_FASTPREP_PTXAS_VERBOSE") == "1":
    NVCC_FLAGS.append("-Xptxas=-v")  # register / spill report in the build log
# Limited-API build: keep any C-API use to Python 3.10's stable subset.
CXX_FLAGS = ["-O3", "-std=c++17", "-DUSE_CUDA", "-DPy_LIMITED_API=0x030A0000"]

sources = sorted(
    str(p.relative_to(ROOT)) for ext in ("*.cpp", "*.cu") for p in (ROOT / "csrc").glob(ext)
)

setup(
    ext_modules=[
        CUDAExtension(
            name="vllm_w4a8_fastprep._C",
            sources=sources,
            include_dirs=[str(ROOT / "csrc")],
            py_limited_api=True,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
