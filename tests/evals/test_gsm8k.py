"""evals.gsm8k: the local task against lm-eval's own gsm8k task, the data check, the per-sample
comparison and report, the command line (from any directory), the pipeline end to end on the CPU
(lm-eval's HF backend) and, on a GPU, with vLLM ours vs upstream."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from evals import gsm8k, make_checkpoint
from scripts import run_main

ROOT = Path(__file__).resolve().parents[2]

ROWS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = 7\n#### 7"),
    ("A box holds 12 eggs. How many eggs are in 2 boxes?", "12 * 2 = 24\n#### 24"),
    ("Sara had 10 dollars and spent 4. How many dollars are left?", "10 - 4 = 6\n#### 6"),
    ("There are 5 cars with 4 wheels each. How many wheels?", "5 * 4 = 20\n#### 20"),
    ("Half of 18 children go home. How many stay?", "18 / 2 = 9\n#### 9"),
]


def write_data(d: Path, rows=ROWS) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name in ("test.jsonl", "train.jsonl"):
        (d / name).write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                      for q, a in rows))
    return d


# ------------------------------------------------------------------------------------ the task
def test_local_task_is_lm_evals_gsm8k_but_for_the_data_source():
    yaml = pytest.importorskip("yaml")
    lm_eval = pytest.importorskip("lm_eval")
    upstream = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" /
                               "gsm8k.yaml").read_text())
    ours = yaml.safe_load((gsm8k.TASK_DIR / "gsm8k_local.yaml").read_text())
    source_keys = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs"}
    assert {k: v for k, v in ours.items() if k not in source_keys} == \
        {k: v for k, v in upstream.items() if k not in source_keys}
    assert upstream["num_fewshot"] == 5 and len(upstream["filter_list"]) == 2
    assert ours["dataset_path"] == "json"
    assert set(ours["dataset_kwargs"]["data_files"]) == {"train", "test"}


def test_write_task_points_at_the_data(tmp_path):
    data = gsm8k.check_data_dir(write_data(tmp_path / "d"))
    name = gsm8k.write_task(data, tmp_path / "task")
    import yaml

    cfg = yaml.safe_load((tmp_path / "task" / "gsm8k_local.yaml").read_text())
    assert name == "gsm8k_local"
    assert cfg["dataset_kwargs"]["data_files"] == {
        "train": str((tmp_path / "d" / "train.jsonl").resolve()),
        "test": str((tmp_path / "d" / "test.jsonl").resolve())}


def test_check_data_dir(tmp_path):
    d = write_data(tmp_path / "d")
    info = gsm8k.check_data_dir(d)
    assert info["test.jsonl"]["rows"] == 5 and info["test.jsonl"]["real_gsm8k"] is False
    with pytest.raises(gsm8k.OneLineError, match="no such folder"):
        gsm8k.check_data_dir(tmp_path / "nope")
    (d / "train.jsonl").unlink()
    with pytest.raises(gsm8k.OneLineError, match="no train.jsonl"):
        gsm8k.check_data_dir(d)
    write_data(d)
    (d / "test.jsonl").write_text('{"question": "q", "answer": "7"}\n')
    with pytest.raises(gsm8k.OneLineError, match=r"test.jsonl:1: not a gsm8k row"):
        gsm8k.check_data_dir(d)
    (d / "test.jsonl").write_text('{"question": "q", "answer": "#### 7"}\n{oops\n')
    with pytest.raises(gsm8k.OneLineError, match=r"test.jsonl:2: not JSON"):
        gsm8k.check_data_dir(d)
    (d / "test.jsonl").write_text("\n")
    with pytest.raises(gsm8k.OneLineError, match="empty"):
        gsm8k.check_data_dir(d)


# ------------------------------------------------------------------------------------ report
def _run(label, responses, strict, scores=(0.5, 0.5)):
    docs = {i: {"doc_id": i, "prompt_hash": f"p{i}", "response": r,
                "strict-match": {"answer": s, "exact_match": float(s == "7")},
                "flexible-extract": {"answer": s, "exact_match": float(s == "7")}}
            for i, (r, s) in enumerate(zip(responses, strict))}
    return {"label": label, "n": len(docs), "docs": docs,
            "scores": dict(zip(gsm8k.METRICS, scores)), "stderr": {}, "log_lines": [],
            "load": {}}


def test_compare_counts_differing_samples():
    a = _run("upstream", ["x #### 7", "y #### 3", "z"], ["7", "3", "[invalid]"])
    b = _run("ours", ["x #### 7", "y #### 8", "zz"], ["7", "8", "[invalid]"])
    c = gsm8k.compare(a, b)
    assert c["docs"] == 3 and c["responses_differ"] == 2 and c["first_differing_docs"] == [1, 2]
    assert c["strict-match_answer_differs"] == 1 and c["prompts_differ"] == 0
    b["docs"][0]["prompt_hash"] = "other"
    assert gsm8k.compare(a, b)["prompts_differ"] == 1


def test_pairs_put_ours_and_the_noise_floor_against_the_first_upstream_run():
    assert gsm8k.pairs(["upstream", "upstream-2", "ours"]) == [
        ("upstream", "ours"), ("upstream", "upstream-2")]
    assert gsm8k.pairs(["ours", "ours-2"]) == [("ours", "ours-2")]
    assert gsm8k.next_label("upstream", {"upstream", "ours"}) == "upstream-2"
    assert gsm8k.next_label("upstream", {"upstream", "upstream-2"}) == "upstream-3"


def test_report_table():
    runs = {"upstream": _run("upstream", ["a", "b"], ["7", "3"], (0.5, 0.75)),
            "ours": _run("ours", ["a", "c"], ["7", "3"], (0.5, 0.75)),
            "upstream-2": _run("upstream-2", ["a", "b"], ["7", "3"], (0.5, 0.7))}
    runs["ours"]["load"] = {"loading_s": 3.11, "weights_s": 0.64, "ours_prep_s": 0.036}
    runs["ours"]["log_lines"] = ["Model loading took 1.2 GiB memory and 3.11 seconds"]
    text, comp = gsm8k.report(runs)
    assert "| ours | 2 | 0.5000 | 0.7500 | 3.11 | 0.64 | 0.036 |" in text
    assert "| upstream vs ours | 2 | 0 | 1 | 0 | 0 | 1 |" in text
    assert "| upstream vs upstream-2 | 2 | 0 | 0 | 0 | 0 | - |" in text
    assert "identical scores (both filters): upstream vs ours" in text
    assert "ours: Model loading took 1.2 GiB memory and 3.11 seconds" in text
    assert comp["upstream vs ours"]["responses_differ"] == 1


def test_report_flags_runs_made_with_other_settings():
    runs = {"upstream": _run("upstream", ["a"], ["7"]), "ours": _run("ours", ["a"], ["7"])}
    runs["upstream"]["model_args"] = "pretrained=m,quantization=compressed-tensors,seed=1"
    runs["ours"]["model_args"] = "pretrained=m,quantization=w4a8_fastprep,seed=1"
    runs["upstream"]["env"] = {"VLLM_W4A8_FASTPREP_AUTO": "0"}
    assert "SETTINGS DIFFER" not in gsm8k.report(runs)[0]
    # a name vLLM gives its shared-memory buffer anew in every process is not a setting
    runs["upstream"]["env"]["VLLM_OBJECT_STORAGE_SHM_BUFFER_NAME"] = "VLLM_OBJECT_STORAGE_SHM_a1"
    runs["ours"]["env"] = {"VLLM_OBJECT_STORAGE_SHM_BUFFER_NAME": "VLLM_OBJECT_STORAGE_SHM_b2"}
    assert "SETTINGS DIFFER" not in gsm8k.report(runs)[0]
    runs["ours"]["env"] = {"VLLM_BATCH_INVARIANT": "1"}
    assert ("SETTINGS DIFFER (not comparable): upstream vs ours (env VLLM_BATCH_INVARIANT: "
            "'unset' vs '1')") in gsm8k.report(runs)[0]


def test_report_flags_samples_missing_from_a_run():
    runs = {"upstream": _run("upstream", ["a", "b", "c"], ["7", "3", "1"]),
            "ours": _run("ours", ["a", "b", "c"], ["7", "3", "1"])}
    for r in runs.values():
        r["n"] = 3
    assert "SAMPLES MISSING" not in gsm8k.report(runs)[0]
    del runs["ours"]["docs"][2]  # a half-copied samples file
    assert ("SAMPLES MISSING (not comparable): upstream vs ours (2 of 3 compared)"
            in gsm8k.report(runs)[0])
    runs["ours"]["docs"] = {}  # no samples file at all
    assert "upstream vs ours (0 of 3 compared)" in gsm8k.report(runs)[0]


def _results_folder(d: Path) -> Path:
    """A results folder as two runs leave it (record, samples, log each)."""
    d.mkdir()
    (d / "data.json").write_text(json.dumps({"test.jsonl": {"rows": 2, "sha256": "x"}}))
    for label in ("upstream", "ours"):
        run = _run(label, ["a #### 7", "b #### 3"], ["7", "3"])
        docs = run.pop("docs")
        run["n"] = 2
        (d / f"{label}.json").write_text(json.dumps(run))
        (d / f"{label}.samples.jsonl").write_text(
            "".join(json.dumps(docs[i]) + "\n" for i in sorted(docs)))
        (d / f"{label}.log").write_text("Loading weights took 0.40 seconds\n")
    return d


def _edit_run(f: Path, **fields):
    f.write_text(json.dumps({**json.loads(f.read_text()), **fields}))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "ours.json").write_text("{oops"), "ours.json: not valid JSON"),
    (lambda d: (d / "ours.json").write_text("[1, 2]"), "ours.json: not a gsm8k run record"),
    (lambda d: (d / "ours.json").write_text('{"label": "ours"}'),
     "ours.json: not a gsm8k run record"),
    (lambda d: (d / "ours.json").write_text('{"label": 5, "n": 2, "scores": {}}'),
     "ours.json: not a gsm8k run record"),
    (lambda d: (d / "ours.samples.jsonl").open("a").write("not json\n"),
     "ours.samples.jsonl:3: not JSON"),
    (lambda d: (d / "ours.samples.jsonl").write_text("[1]\n"),
     "ours.samples.jsonl:1: not a sample"),
    (lambda d: (d / "data.json").write_text("{oops"), "data.json: not valid JSON"),
    (lambda d: _edit_run(d / "ours.json", env=["x"]), "ours.json: not a gsm8k run record"),
    (lambda d: _edit_run(d / "ours.json", stderr=[1]), "ours.json: not a gsm8k run record"),
    (lambda d: _edit_run(d / "ours.json", scores={"exact_match,strict-match": "0.5"}),
     "ours.json: not a gsm8k run record"),
    (lambda d: (d / "ours.samples.jsonl").unlink(),
     "some runs are not comparable (SETTINGS DIFFER or SAMPLES MISSING above)"),
])
def test_report_on_a_damaged_folder_is_one_error(tmp_path, damage, message, capsys):
    d = _results_folder(tmp_path / "res")
    p = _main(capsys, "--report", "--out-dir", d)
    assert p.returncode == 0 and "| upstream vs ours | 2 | 0 | 0 |" in p.stdout, p.stderr
    damage(d)
    p = _main(capsys, "--report", "--out-dir", d)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and message in p.stderr, p.stderr


def test_a_run_record_may_hold_a_null_stderr(tmp_path, capsys):
    d = _results_folder(tmp_path / "res")
    _edit_run(d / "ours.json", stderr=None)
    p = _main(capsys, "--report", "--out-dir", d)
    assert p.returncode == 0 and "| ours | 2 | 0.5000 | 0.5000 |" in p.stdout, p.stderr


def test_out_dir_that_is_a_file_is_one_error(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for args in (("--report",), ("--model", tmp_path)):
        p = _main(capsys, *args, "--out-dir", tmp_path / "f")
        assert p.returncode == 2 and "--out-dir" in p.stderr and "is not a folder" in p.stderr
        assert "Traceback" not in p.stderr


def test_the_same_data_in_another_folder_is_the_same_data():
    a = {"test.jsonl": {"path": "/a/test.jsonl", "rows": 1319, "sha256": "s"}}
    b = {"test.jsonl": {"path": "/b/test.jsonl", "rows": 1319, "sha256": "s"}}
    assert gsm8k.same_data(a, b)
    b["test.jsonl"]["sha256"] = "t"
    assert not gsm8k.same_data(a, b)
    assert not gsm8k.same_data([1], [1])


def test_samples_by_doc_merges_the_filters():
    samples = [{"doc_id": 0, "filter": f, "resps": [["r #### 7"]], "filtered_resps": [a],
                "exact_match": 1.0, "prompt_hash": "h", "target": "#### 7"}
               for f, a in (("strict-match", "7"), ("flexible-extract", "7"))]
    docs = gsm8k.samples_by_doc(samples)
    assert docs[0]["response"] == "r #### 7"
    assert docs[0]["strict-match"] == {"answer": "7", "exact_match": 1.0}
    assert set(docs[0]) == {"doc_id", "prompt_hash", "response", "target", "strict-match",
                            "flexible-extract"}


# ------------------------------------------------------------------------------------ CLI
def _main(capsys, *args):
    """gsm8k's main in this process (its one-line errors and exit status as from the command
    line; the tests that start it as a process check that way of running it)."""
    status, out, err = run_main(gsm8k.main, args, capsys)
    return SimpleNamespace(returncode=status, stdout=out, stderr=err)


def _cli(*args, cwd=ROOT, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "evals" / "gsm8k.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    ((), "--model is required"),
    (("--model", "{tmp}/none"), "is not a model folder"),
    (("--model", "{ckpt}", "--modes", "fast"), "--modes takes upstream and ours"),
    (("--model", "{ckpt}", "--batch-size", "0"), "--batch-size must be auto or a positive"),
    (("--model", "{ckpt}", "--limit", "0"), "--limit must be positive"),
    (("--model", "{ckpt}", "--hub", "--data-dir", "{tmp}"), "exclude each other"),
    (("--model", "{ckpt}", "--num-fewshot", "x"), "argument --num-fewshot: invalid int value"),
    (("--model", "{ckpt}", "--timeout", "0"), "--timeout must be positive, not 0"),
    (("--model", "{ckpt}", "--max-model-len", "-1"), "--max-model-len must be positive"),
    (("--model", "{ckpt}", "--gpu-memory-utilization", "1.5"),
     "--gpu-memory-utilization must be in (0, 1]"),
    (("--bogus",), "unrecognized arguments: --bogus"),
])
def test_bad_arguments_give_one_error(tmp_path, args, message, capsys, monkeypatch):
    ckpt = tmp_path / "m"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    p = _main(capsys, *[a.format(tmp=tmp_path, ckpt=ckpt) for a in args])
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr  # not argparse's whole usage


def test_bad_data_gives_one_error(tmp_path):
    ckpt = tmp_path / "m"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    d = write_data(tmp_path / "d")
    (d / "test.jsonl").write_text("{}\n")
    p = _cli("--model", ckpt, "--data-dir", d, cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"gsm8k: error: {d / 'test.jsonl'}:1: not a gsm8k row (need " \
                               "'question' and an 'answer' ending in '#### N')"
    p = _cli("--report", "--out-dir", tmp_path / "empty", cwd=tmp_path)
    assert p.returncode == 1 and "no gsm8k runs to report" in p.stderr


def test_missing_lm_eval_is_one_error_before_any_run(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "m"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    real = gsm8k.importlib.util.find_spec
    monkeypatch.setattr(gsm8k.importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    out = tmp_path / "res"
    rc = gsm8k.main(["--model", str(ckpt), "--data-dir", str(write_data(tmp_path / "d")),
                     "--backend", "hf", "--out-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("gsm8k: error: lm-eval is not installed in this Python")
    assert len(err.splitlines()) == 1 and not out.exists()


def _processes_naming(text: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().decode(errors="replace").replace(
                        "\0", " "):
                    found.append(int(d.name))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("signum, status", [(2, 130), (15, 143)])
def test_interrupting_stops_the_running_run_and_its_processes(tmp_path, signum, status):
    """Ctrl-C (SIGINT) or SIGTERM while a run is going: the run's whole process group is
    killed (the worker is in a session of its own, so it does not get the terminal's
    signal), one line, exit 130 / 143, and the run leaves no result behind."""
    pytest.importorskip("lm_eval")
    import signal
    import time

    _tiny_dense_model(tmp_path / "tiny")
    write_data(tmp_path / "data")
    out = tmp_path / "res-interrupted"
    p = subprocess.Popen([sys.executable, str(ROOT / "evals" / "gsm8k.py"), "--model", "tiny",
                          "--data-dir", "data", "--backend", "hf", "--modes", "upstream",
                          "--limit", "2", "--num-fewshot", "1", "--out-dir", str(out)],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                     signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and not _processes_naming(f"--worker --mode upstream "
                                                           f"--label upstream --out-dir {out}"):
        time.sleep(0.1)
    assert _processes_naming("--worker --mode upstream --label upstream --out-dir "
                             f"{out}"), "the worker never started"
    p.send_signal(signum)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == status, stderr
    assert stderr.strip().startswith("gsm8k: error: interrupted: stopped run upstream")
    assert len(stderr.strip().splitlines()) == 1, stderr
    time.sleep(1)
    assert not _processes_naming(f"--out-dir {out}"), "the worker outlived the interrupt"
    assert not (out / "upstream.json").exists()


def test_vllm_backend_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    ckpt = tmp_path / "m"
    make_checkpoint.main(["synthetic", str(ckpt), "--layers", "1"])
    p = _cli("--model", ckpt, "--data-dir", write_data(tmp_path / "d"), cwd=tmp_path)
    assert p.returncode == 2 and "needs a CUDA GPU" in p.stderr


def _tiny_dense_model(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_w4a8_fastprep.tools.synthetic import write_tokenizer

    vocab = write_tokenizer(path, 512)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab,
                      max_position_embeddings=2048, bos_token_id=0, eos_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


def test_pipeline_on_cpu_from_another_directory_same_run_twice_differs_nowhere(tmp_path):
    """lm-eval's HF backend (no vLLM: the same dense run twice) through our local task, started
    from a folder outside the repository with relative paths: scores, logged samples and the
    comparison, which must find no difference between two identical CPU runs."""
    pytest.importorskip("lm_eval")
    work = tmp_path / "elsewhere"
    work.mkdir()
    _tiny_dense_model(work / "tiny")
    write_data(work / "data")
    p = _cli("--model", "tiny", "--data-dir", "data", "--backend", "hf", "--modes",
             "upstream,upstream", "--limit", "3", "--num-fewshot", "1", "--batch-size", "1",
             "--gen-kwargs", "max_gen_toks=8", "--out-dir", "res", "--in-process-engine",
             cwd=work, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = work / "res"
    for label in ("upstream", "upstream-2"):
        r = json.loads((res / f"{label}.json").read_text())
        assert r["task"] == "gsm8k_local" and r["n"] == 3 and r["num_fewshot"] == 1
        # the settings the run started with, flags included (what runs are compared by)
        assert r["env"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        assert 0.0 <= r["scores"]["exact_match,flexible-extract"] <= 1.0
        docs = (res / f"{label}.samples.jsonl").read_text().splitlines()
        assert len(docs) == 3 and "strict-match" in json.loads(docs[0])
    summary = json.loads((res / "summary.json").read_text())
    c = summary["comparisons"]["upstream vs upstream-2"]
    assert c["docs"] == 3 and c["responses_differ"] == 0 and c["prompts_differ"] == 0
    assert summary["data"]["test.jsonl"]["rows"] == 5
    assert "| upstream vs upstream-2 | 3 | 0 | 0 | 0 | 0 | - |" in p.stdout
    # a later invocation adds a run to the same folder and reports all of them
    p = _cli("--report", "--out-dir", "res", cwd=work)
    assert p.returncode == 0 and "| upstream-2 | 3 |" in p.stdout


@pytest.mark.gpu
def test_vllm_ours_vs_upstream_on_a_synthetic_checkpoint(tmp_path):
    """On a GPU: both modes through lm-eval's vLLM backend; ours logs its preparation line,
    upstream does not, and the greedy responses are the same."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("lm_eval")
    ckpt = tmp_path / "m"
    make_checkpoint.main(["synthetic", str(ckpt), "--layers", "2"])
    p = _cli("--model", ckpt, "--data-dir", write_data(tmp_path / "d"), "--limit", "5",
             "--gen-kwargs", "max_gen_toks=16", "--attention-backend", "TRITON_ATTN",
             "--gpu-memory-utilization", "0.3", "--in-process-engine", "--out-dir",
             tmp_path / "res", timeout=1200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    s = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert s["comparisons"]["upstream vs ours"]["responses_differ"] == 0
    assert s["runs"]["ours"]["load"].get("ours_layers", 0) > 0
    assert "ours_layers" not in s["runs"]["upstream"]["load"]


# ------------------------------------------------------------------------------------ GPU script
def test_gpu_script_refuses_an_unknown_mode_and_leaves_nothing_behind(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    env = dict(os.environ, OUT=str(tmp_path / "out"), MODEL=str(tmp_path / "m"),
               HOME=str(tmp_path / "home"), VB=str(tmp_path / "vb"))
    p = subprocess.run(["bash", str(ROOT / "evals" / "gpu_gsm8k.sh"), "gsm8k", "upstream",
                        "fast"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 2 and p.stderr.strip() == "gsm8k: unknown mode 'fast' (upstream or ours)"
    assert not list((tmp_path / "out").iterdir()) and not (tmp_path / "home").exists()
