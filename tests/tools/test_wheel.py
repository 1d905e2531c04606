"""The prebuilt wheel: ``python -m pip wheel --no-deps --no-build-isolation .``
gives one abi3 wheel (cp310-abi3) that carries the compiled extension and,
installed with pip into a fresh venv on a machine without nvcc, loads its ops
from outside the source tree.

Builds a wheel, so it runs in CI (CI=true, after the README's set-up, whose
compiled objects under build/ the wheel build reuses) or when
W4A8_FASTPREP_TEST_WHEEL=1; elsewhere it is skipped."""

import json
import os
import pathlib
import subprocess
import sys
import time
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
WHEEL_GLOB = "vllm_w4a8_fastprep-*-cp310-abi3-linux_x86_64.whl"

builds_wheel = pytest.mark.skipif(
    os.environ.get("CI") != "true" and os.environ.get("W4A8_FASTPREP_TEST_WHEEL") != "1",
    reason="builds the wheel: runs in CI (CI=true) or with W4A8_FASTPREP_TEST_WHEEL=1",
)


def _without_toolkit(**extra) -> dict:
    """This environment with no CUDA toolkit to be found (PATH without nvcc)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in ("/usr/bin", "/bin") if os.path.isdir(p))
    assert not any((pathlib.Path(p) / "nvcc").exists() for p in env["PATH"].split(os.pathsep))
    env.update(extra)
    return env


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _root_metadata() -> dict[str, int]:
    """The files of a ``*.egg-info`` folder beside the package, with their
    modification times (none on a fresh clone)."""
    return {str(f): f.stat().st_mtime_ns for f in ROOT.glob("*.egg-info/*")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    before = _root_metadata()
    start = time.monotonic()
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(dist)],
        cwd=ROOT,
    )
    print(f"wheel built in {time.monotonic() - start:.1f} s")
    # The build writes its metadata under build/: the checkout's root, first on
    # sys.path for `python -m pytest`, is where the other tests running now
    # find the plugin's entry points.
    assert _root_metadata() == before, "the wheel build wrote package metadata beside the package"
    wheels = sorted(dist.glob("*.whl"))
    assert [w.name for w in wheels] == [w.name for w in dist.glob(WHEEL_GLOB)] and len(wheels) == 1, wheels
    return wheels[0]


@builds_wheel
def test_wheel_is_abi3_and_carries_the_extension(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "vllm_w4a8_fastprep/_C.abi3.so" in names
    assert "vllm_w4a8_fastprep/ops.py" in names
    assert "vllm_w4a8_fastprep/tools/cli.py" in names  # the command line and its tools too
    wheel_meta = next(n for n in names if n.endswith(".dist-info/WHEEL"))
    tags = [line for line in zipfile.ZipFile(wheel).read(wheel_meta).decode().splitlines() if line.startswith("Tag:")]
    assert tags == ["Tag: cp310-abi3-linux_x86_64"]


@builds_wheel
def test_wheel_installs_and_loads_without_nvcc(wheel, tmp_path):
    # A fresh venv (no pip of its own, nothing of this checkout); torch and
    # vLLM come from this interpreter's site-packages, appended after the
    # venv's own (a .pth in that folder is not processed there, so this
    # checkout's editable install stays out, even where that site-packages
    # lies inside the checkout, as the README's .venv does).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    venv_site = pathlib.Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    )
    outer = [
        p
        for p in sys.path
        if pathlib.Path(p).name in ("site-packages", "dist-packages")
        and pathlib.Path(p).is_dir()
    ]
    (venv_site / "outer_site_packages.pth").write_text("\n".join(outer) + "\n")

    no_toolkit = _without_toolkit()
    _run(
        # --ignore-installed: where the outer site-packages holds an installed
        # copy (CI's second venv), pip would otherwise see it and install nothing
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
         "--ignore-installed", str(wheel)],
        env=no_toolkit,
    )

    probe = (
        "import json, torch; from vllm_w4a8_fastprep import ops; "
        "print(json.dumps([ops.__file__, ops.extension_error(), "
        "torch.ops.w4a8_fastprep.constant('group_size')]))"
    )
    out = _run([str(python), "-c", probe], cwd=tmp_path, env=no_toolkit)
    path, error, group_size = json.loads(out.strip().splitlines()[-1])
    assert pathlib.Path(path).is_relative_to(venv_site), path  # not this checkout
    assert error is None
    assert group_size == 128


def test_building_without_nvcc_says_what_to_do(tmp_path):
    # CUDA_HOME pointing at a runtime-only install (no bin/nvcc), as in vLLM's
    # serving images: one message naming the toolkit and the wheel way out.
    runtime_only = tmp_path / "cuda"
    (runtime_only / "lib64").mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_without_toolkit(CUDA_HOME=str(runtime_only)),
    )
    out = " ".join((proc.stdout + proc.stderr).split())  # pip indents the build's output
    assert proc.returncode != 0
    assert f"nvcc from the CUDA 13.0 toolkit, and none was found (expected at {runtime_only}/bin/nvcc)" in out
    assert "python -m pip wheel --no-deps --no-build-isolation . -w dist" in out
    assert "cp310-abi3-linux_x86_64.whl" in out
    assert not list(tmp_path.glob("*.whl"))


def test_the_sdist_carries_every_file_the_build_needs(tmp_path):
    """The source archive (what ``python -m build`` turns into a wheel) holds
    every tracked file of csrc/ (the headers too) and of the package, and no
    compiled object, also where no CUDA toolkit is found. Built from a copy of the checkout's tracked files (as a
    fresh clone: setuptools would take the file list of an earlier build's
    metadata under build/)."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout, or no git: {listed.stderr.strip()[:200]}")
    import shutil
    import tarfile

    src, dist = tmp_path / "src", tmp_path / "dist"
    for name in listed.stdout.split():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    code = ("import sys; from setuptools import build_meta; "
            "print(build_meta.build_sdist(sys.argv[1]))")
    # no toolkit either (CUDA_HOME a folder without nvcc): then no extension is defined
    (tmp_path / "cuda").mkdir()
    out = _run([sys.executable, "-c", code, str(dist)], cwd=src,
               env=_without_toolkit(CUDA_HOME=str(tmp_path / "cuda")))
    with tarfile.open(dist / out.strip().splitlines()[-1]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {n for n in listed.stdout.split() if n.startswith(("csrc/", "vllm_w4a8_fastprep/"))}
    needed |= {"setup.py", "pyproject.toml", "README.md", "LICENSE"}
    assert not sorted(needed - names), f"the sdist lacks {sorted(needed - names)}"
    assert not [n for n in names if n.endswith((".so", ".o"))], sorted(names)
