"""The one oracle lookup of the GPU tests (vllm_w4a8_fastprep/tools/vllm_ops.py), on the CPU."""

import importlib.util
import lzma
import pathlib

import pytest

from vllm_w4a8_fastprep.tools import vllm_ops as oracle
from upstream_child import run_python


@pytest.fixture
def no_repo_copy(monkeypatch, tmp_path):
    monkeypatch.delenv(oracle.ENV, raising=False)
    monkeypatch.setattr(oracle, "REPO_COPY", tmp_path / ".oracle" / "vllm-0.26.0-_C.so")
    return oracle.REPO_COPY


def test_variable_comes_first(monkeypatch, tmp_path, no_repo_copy):
    lib = tmp_path / "lib_C.so"
    lib.write_bytes(b"x")
    no_repo_copy.parent.mkdir()
    no_repo_copy.write_bytes(b"y")
    monkeypatch.setenv(oracle.ENV, str(lib))
    assert oracle.find_oracle() == lib.resolve()


def test_variable_naming_a_missing_file_is_an_error(monkeypatch, tmp_path, no_repo_copy):
    monkeypatch.setenv(oracle.ENV, str(tmp_path / "missing.so"))
    with pytest.raises(oracle.OracleError, match="no such file"):
        oracle.find_oracle()


def test_repo_copy_unpacked_from_xz(no_repo_copy):
    no_repo_copy.parent.mkdir()
    payload = bytes(range(256)) * 1000
    with lzma.open(str(no_repo_copy) + ".xz", "wb") as f:
        f.write(payload)
    assert oracle.find_oracle() == no_repo_copy
    assert no_repo_copy.read_bytes() == payload
    left = sorted(p.name for p in no_repo_copy.parent.iterdir())
    assert left == sorted([no_repo_copy.name, no_repo_copy.name + ".xz"])  # no temporary file left


LOOKUP = """
import pathlib, sys
from vllm_w4a8_fastprep.tools import vllm_ops as oracle
oracle.REPO_COPY = pathlib.Path(sys.argv[1])
print(oracle.find_oracle())
print("vllm imported:", "vllm" in sys.modules)
"""


def test_installed_vllm_package_last(no_repo_copy):
    spec = importlib.util.find_spec("vllm")
    if spec is None:
        pytest.skip("vllm is not installed here")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0])
    want = next((folder / n for n in oracle.PACKAGE_NAMES if (folder / n).is_file()), None)
    if want is None:
        pytest.skip("this vllm install has no compiled _C library")
    assert oracle.find_oracle() == want
    # in a fresh process: found without importing vllm
    proc = run_python(LOOKUP, str(no_repo_copy))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [str(want), "vllm imported: False"], proc.stdout


def test_a_second_copy_beside_the_importable_vllm_is_refused(tmp_path):
    if oracle._package_library() is None:
        pytest.skip("no importable vllm package with its _C library here")
    copy = tmp_path / "vllm-0.26.0-_C.so"
    copy.write_bytes(b"not loaded")
    with pytest.raises(oracle.OracleError, match="register its ops twice"):
        oracle.load(copy)


def test_a_library_named_by_the_user_is_loaded_or_one_error_naming_it(tmp_path):
    """``--upstream PATH`` of the command line and the benchmark."""
    with pytest.raises(oracle.OracleError, match=rf"^{tmp_path}/none.so: no such file$"):
        oracle.load_given(str(tmp_path / "none.so"))
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not a library")
    with pytest.raises(oracle.OracleError, match=rf"^{junk}: cannot load it as a torch library"):
        oracle.load_given(str(junk))
