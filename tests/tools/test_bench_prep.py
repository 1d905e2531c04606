"""The kernel benchmark (benchmarks/bench_prep.py): it runs (``--smoke`` on
the CPU in CI, a subprocess so a broken script fails here), its shapes come
from model_shapes, bad arguments get one line and exit 2, and on a GPU with
vLLM's ops it reports ours equal to upstream."""

import ast
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from scripts import load_script, run_main, run_script
from vllm_w4a8_fastprep.tools import model_shapes

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_prep.py"


def test_smoke_run_measures_every_dense_shape(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script(SCRIPT, "--smoke", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SMOKE RUN" in proc.stdout and "Traceback" not in proc.stderr
    res = json.loads(out.read_text())
    bench = load_script(SCRIPT)
    want = [{"name": name, "N": n, "K": k} for name, (n, k) in bench.SMOKE_DENSE.items()]
    for part in ("weights", "scales"):
        assert [{key: r[key] for key in ("name", "N", "K")} for r in res[part]] == want
        for r in res[part]:
            assert r["ours"]["median_ms"] > 0 and r["ours"]["reps"] == 2
    for r in res["weights"]:
        assert r["copy"]["median_ms"] > 0
    assert res["smoke"] is True and res["device"] == "cpu"


def test_smoke_moe_measures_every_layer(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script(SCRIPT, "--smoke", "--moe", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [(r["layer"], r["tensor"], r["E"], r["N"], r["K"]) for r in res["weights"]] == [
        ("smoke@e3", "w13", 3, 512, 256), ("smoke@e3", "w2", 3, 256, 256)]
    for r in res["weights"]:
        assert r["ours"]["median_ms"] > 0 and r["copy"]["median_ms"] > 0
    assert [r["layer"] for r in res["layers"]] == ["smoke@e3"]
    assert res["layers"][0]["ours"]["median_ms"] > 0


def test_moe_layers_pair_w13_and_w2_of_the_shape_table():
    bench = load_script(SCRIPT)
    layers = bench.moe_layers(model_shapes.MOE)
    assert set(layers) == {"qwen3-30b-a3b@tp1", "qwen3-30b-a3b@tp2", "deepseek-v3@ep8",
                           "deepseek-v3@tp8", "deepseek-v3@tp1"}
    for name, ((e, n13, k13), (e2, n2, k2)) in layers.items():
        arch = model_shapes.ARCHS[name.split("@")[0]]
        assert e == e2 and k13 == n2 == arch.hidden and n13 == 2 * k2, name
    assert layers["deepseek-v3@tp1"] == ((256, 4096, 7168), (256, 7168, 2048))
    assert layers["qwen3-30b-a3b@tp1"] == ((128, 1536, 2048), (128, 2048, 768))


def test_dense_shapes_are_the_shape_table():
    bench = load_script(SCRIPT)
    assert bench.pick(model_shapes.DENSE, None) == model_shapes.DENSE
    assert set(bench.pick(model_shapes.DENSE, ["llama3-70b/down"])) == {
        "llama3-70b/down@tp1", "llama3-70b/down@tp8"}


def test_no_function_shadows_a_module_import():
    """The regression that broke the benchmark: a local name equal to a
    module alias makes every earlier use in that function an
    UnboundLocalError (CPU runs do not reach the upstream branches)."""
    tree = ast.parse(SCRIPT.read_text())
    imported = {(a.asname or a.name).split(".")[0] for node in tree.body
                if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.Lambda)):
            continue
        assigned = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)
                    and isinstance(n.ctx, ast.Store)}
        if isinstance(fn, ast.FunctionDef):
            assigned |= {a.arg for a in fn.args.args + fn.args.kwonlyargs}
        assert not assigned & imported, (getattr(fn, "name", "lambda"), assigned & imported)


@pytest.mark.parametrize("args, message", [
    (["--smoke", "--reps", "0"], "argument --reps: must be >= 1, got 0"),
    (["--smoke", "--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (["--smoke", "--bogus"], "unrecognized arguments: --bogus"),
    (["--smoke", "--json", "/proc/no/such.json"], "--json /proc/no/such.json: cannot write it"),
    (["--smoke", "--only", "nothing-like-this"], "matches none of"),
    (["--smoke", "--device", "cpu", "--upstream", "auto"], "needs --device cuda"),
    (["--smoke", "--device", "tpu"], "--device"),
])
def test_bad_arguments_one_line_exit_2(args, message, capsys):
    status, out, err = run_main(load_script(SCRIPT).main, args, capsys)
    assert status == 2, (status, err)
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    if "--json" in args:
        assert out == ""  # refused before any measurement


def test_a_bad_argument_in_a_real_process_is_one_line_exit_2():
    proc = run_script(SCRIPT, "--smoke", "--reps", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "bench_prep: error: argument --reps: must be >= 1, got 0 (see --help)"], proc.stderr


def test_without_gpu_one_line_exit_2():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    proc = run_script(SCRIPT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "bench_prep: error: needs a CUDA GPU (none found); --smoke " \
                                  "runs on the CPU"
    assert proc.stdout == ""


def _oracle() -> str:
    from vllm_w4a8_fastprep.tools.vllm_ops import find_oracle, searched

    path = find_oracle()
    if path is None:
        pytest.skip(f"upstream vLLM ops library not found in: {searched()}")
    return str(path)


@pytest.mark.gpu
def test_gpu_smoke_with_upstream_is_byte_exact(tmp_path):
    """The GPU branches (CUDA events, peak memory, upstream's chains) on tiny
    shapes; every row that upstream ran says ours == upstream."""
    out = tmp_path / "bench.json"
    proc = run_script(SCRIPT, "--smoke", "--device", "cuda", "--upstream", _oracle(), "--json",
                      str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    ran = [r for part in ("weights", "scales") for r in res[part] if "same_as_upstream" in r]
    assert ran and all(r["same_as_upstream"] for r in ran)
    assert all(r["ours_extra_bytes"] > 0 for r in res["weights"])
    # K % 256 == 128: upstream's op is not run there
    assert [r["K"] % 256 for r in res["weights"] if "upstream_op" in r] == [0]


@pytest.mark.gpu
def test_gpu_smoke_moe_with_upstream_is_byte_exact(tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("upstream's MoE scale chain calls the vllm package, not installed here")
    out = tmp_path / "bench.json"
    proc = run_script(SCRIPT, "--smoke", "--moe", "--device", "cuda", "--upstream", _oracle(),
                      "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r.get("same_as_upstream") for r in res["layers"]] == [True]


def test_gpu_suite_script_parses_and_runs_both_benchmarks():
    script = ROOT / "benchmarks" / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "python3 -m vllm_w4a8_fastprep.tools.vllm_ops" in text  # the one oracle lookup
    assert "bench_prep.py $up --json" in text and "bench_prep.py --moe $up --json" in text
