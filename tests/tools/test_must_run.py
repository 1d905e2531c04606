"""The rule of tests/support/must_run.py: on compute capability 9.x a test that lacks
what it needs fails (unless W4A8_FASTPREP_ALLOW_SKIP=1); elsewhere it skips."""

import pytest

from must_run import ALLOW_SKIP, must_run, skip_or_fail


@pytest.mark.parametrize("capability,allow,want", [
    ((9, 0), None, True), ((9, 0), "", True), ((9, 0), "0", True),
    ((9, 0), "1", False),
    ((8, 0), None, False), ((10, 0), None, False), ((12, 0), None, False),
    (None, None, False),  # no GPU
])
def test_must_run_only_on_compute_capability_9(capability, allow, want):
    assert must_run(capability, allow) is want


def test_skip_or_fail_skips_where_skipping_is_allowed(monkeypatch):
    monkeypatch.setenv(ALLOW_SKIP, "1")  # also on a 9.x GPU
    with pytest.raises(pytest.skip.Exception, match="the thing is missing"):
        skip_or_fail("the thing is missing", "provide the thing")


def test_skip_or_fail_fails_where_everything_must_run():
    with pytest.raises(pytest.fail.Exception) as info:
        skip_or_fail("the thing is missing", "provide the thing", here=True)
    msg = str(info.value)
    assert "the thing is missing" in msg and "provide the thing" in msg
    assert f"{ALLOW_SKIP}=1" in msg


def test_skip_or_fail_skips_elsewhere():
    with pytest.raises(pytest.skip.Exception, match="the thing is missing"):
        skip_or_fail("the thing is missing", "provide the thing", here=False)


def test_conftest_documents_the_opt_out():
    import pathlib

    assert ALLOW_SKIP == "W4A8_FASTPREP_ALLOW_SKIP"
    assert ALLOW_SKIP in (pathlib.Path(__file__).parents[1] / "conftest.py").read_text()


MOE_TESTS = "tests/plugin/test_moe.py"


def test_tests_that_build_vllm_layers_are_part_of_the_gpu_suite(request):
    """conftest marks every test using ``vllm_ctx`` (vLLM layers, built on the GPU where
    there is one) ``vllm_layers``, so ``-m "gpu or vllm_layers"`` runs them on the GPU.
    Read from this session's own collection where it holds the MoE tests looked at (the
    README's command); else from a collection of them in a process of its own."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("vllm")
    root = Path(__file__).resolve().parents[2]
    items = [i for i in request.session.items if i.nodeid.startswith(MOE_TESTS + "::")]
    names = {i.originalname for i in items}
    if {"test_vllms_layerwise_reload_prepares_dense_and_moe_layers_again",
            "test_expert_and_tensor_parallel_ranks_load_and_prepare_their_slices"} <= names:
        ids = [i.nodeid for i in items if i.get_closest_marker("vllm_layers")]
        ids += [i.nodeid for i in request.session.items if i.nodeid.startswith(
            "tests/tools/test_must_run.py::") and i.get_closest_marker("vllm_layers")]
    else:
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                               "-p", "no:cacheprovider", "-m", "vllm_layers",
                               MOE_TESTS, "tests/tools/test_must_run.py"],
                              cwd=root, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        ids = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    assert MOE_TESTS + "::test_vllms_layerwise_reload_prepares_dense_and_moe_layers_again" in ids
    assert not [i for i in ids if "test_must_run.py" in i]  # no vllm_ctx there
    # two processes of their own, on the CPU: not vLLM layers of this process
    assert not [i for i in ids if "test_expert_and_tensor_parallel_ranks" in i]
