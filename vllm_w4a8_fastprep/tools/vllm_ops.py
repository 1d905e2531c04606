"""Where vLLM's compiled ops library is (the GPU tests' oracle, the
benchmark's upstream), and loading it.

One lookup for every test, script and child process, in this order:

1. ``$W4A8_FASTPREP_ORACLE``: a path to vLLM's ``_C`` library (when set, it
   must exist: a wrong path is an error, not a silent fall-through);
2. ``.oracle/vllm-0.26.0-_C.so`` in the repository, unpacked from
   ``.oracle/vllm-0.26.0-_C.so.xz`` when only the archive is there (what
   ``../shared/tools/vllm-oracle`` writes);
3. the installed ``vllm`` package's ``_C_stable_libtorch.abi3.so`` or
   ``_C.abi3.so``, found with ``importlib.util.find_spec`` (vllm itself is not
   imported: importing it would register its own ops and fake kernels).

Child processes get the path found here as an argument; they never look
it up again.
"""

from __future__ import annotations

import importlib.util
import lzma
import os
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the source tree (above the package)
ENV = "W4A8_FASTPREP_ORACLE"
#: the vLLM release of the repository's copy (what the vllm-oracle tool writes)
REPO_COPY_RELEASE = "0.26.0"
REPO_COPY = ROOT / ".oracle" / f"vllm-{REPO_COPY_RELEASE}-_C.so"
#: what to do where no library is found (skip and failure messages)
PROVIDE = (f"set {ENV} to a supported vLLM's _C library, put vLLM {REPO_COPY_RELEASE}'s at "
           f"{REPO_COPY.relative_to(ROOT)}, or install a vLLM wheel of the supported range")
PACKAGE_NAMES = ("_C_stable_libtorch.abi3.so", "_C.abi3.so")


class OracleError(RuntimeError):
    """The oracle was asked for explicitly but cannot be used."""


def _unpack(archive: pathlib.Path, dest: pathlib.Path) -> None:
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    with lzma.open(archive) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, length=16 << 20)
    os.replace(tmp, dest)  # atomic: a concurrent reader sees all or nothing


def _package_library() -> pathlib.Path | None:
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for name in PACKAGE_NAMES:
            path = pathlib.Path(folder) / name
            if path.is_file():
                return path
    return None


def find_oracle() -> pathlib.Path | None:
    """The oracle library's path, or None when none of the three places has it.

    Raises OracleError when ``$W4A8_FASTPREP_ORACLE`` names a missing file.
    """
    env = os.environ.get(ENV, "")
    if env:
        path = pathlib.Path(env).expanduser()
        if not path.is_file():
            raise OracleError(f"{ENV}={env} but no such file")
        return path.resolve()
    if not REPO_COPY.is_file():
        archive = REPO_COPY.with_name(REPO_COPY.name + ".xz")
        if archive.is_file():
            _unpack(archive, REPO_COPY)
    if REPO_COPY.is_file():
        return REPO_COPY
    return _package_library()


def searched() -> str:
    """Where find_oracle looks (for skip messages)."""
    return (f"${ENV}, {REPO_COPY} (or its .xz), the vllm package's "
            f"{' / '.join(PACKAGE_NAMES)}")


def load(path: pathlib.Path):
    """Loads the library into this process once; returns ``torch.ops._C``.

    Where the vllm package is importable, importing it (as the upstream MoE
    scale chain does) loads its own ``_C`` library: a second copy from
    another file would register the same ops twice. So then ``path`` must be
    that very file (OracleError otherwise, saying which)."""
    import torch

    package = _package_library()
    if package is not None and not os.path.samefile(package, path):
        raise OracleError(
            f"the oracle {path} is not the importable vllm package's own library "
            f"{package}; importing vllm would load that one too and register its ops "
            f"twice: set {ENV}={package} (or run where vllm is not importable)")
    if not hasattr(torch.ops._C, "cutlass_encode_and_reorder_int4b"):
        torch.ops.load_library(str(path))
    return torch.ops._C


def load_given(path: str):
    """``torch.ops._C`` from the library file a user named (``--upstream
    PATH``): loaded once per process; OracleError naming the file where it
    is missing, does not load, or has not vLLM's W4A8 ops."""
    import torch

    if not pathlib.Path(path).is_file():
        raise OracleError(f"{path}: no such file")
    if not hasattr(torch.ops._C, "cutlass_encode_and_reorder_int4b"):
        try:
            torch.ops.load_library(path)
        except Exception as e:  # noqa: BLE001  (any loader failure: say which)
            raise OracleError(f"{path}: cannot load it as a torch library ({e})") from None
    if not hasattr(torch.ops._C, "cutlass_encode_and_reorder_int4b"):
        raise OracleError(f"{path}: no cutlass_encode_and_reorder_int4b in torch.ops._C")
    return torch.ops._C


if __name__ == "__main__":  # python -m vllm_w4a8_fastprep.tools.vllm_ops: the path found (or why none)
    try:
        found = find_oracle()
    except OracleError as e:
        raise SystemExit(f"error: {e}")
    print(found if found else f"no oracle library found in: {searched()}")
