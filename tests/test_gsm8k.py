"""evals.gsm8k on the CPU: the report, and the pipeline end to end (lm-eval's HF backend, a tiny
model, a local gsm8k-format task)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evals import gsm8k, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_gsm8k_report():
    res = {"upstream": {"scores": {gsm8k.METRICS[0]: 0.5, gsm8k.METRICS[1]: 0.75}},
           "ours": {"scores": {gsm8k.METRICS[0]: 0.5, gsm8k.METRICS[1]: 0.75}}}
    text = gsm8k.report(res)
    assert "| exact_match,strict-match | 0.5000 | 0.5000 | +0.0000 |" in text


def _tiny_dense_model(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_w4a8_fastprep.synthetic import write_tokenizer

    vocab = write_tokenizer(path, 512)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab,
                      max_position_embeddings=2048, bos_token_id=0, eos_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


def test_gsm8k_pipeline_end_to_end_on_cpu(tmp_path):
    pytest.importorskip("lm_eval")
    model = _tiny_dense_model(tmp_path / "tiny-dense")
    out = tmp_path / "res"
    proc = subprocess.run(
        [sys.executable, "-m", "evals.gsm8k", "--model", str(model), "--backend", "hf",
         "--local-task", str(ROOT / "evals" / "tasks" / "gsm8k_local"), "--limit", "3",
         "--num-fewshot", "1", "--batch-size", "1", "--gen-kwargs", "max_gen_toks=8",
         "--out-dir", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| exact_match,strict-match |" in proc.stdout
    for mode in ("upstream", "ours"):
        res = json.loads((out / f"{mode}.json").read_text())
        assert res["task"] == "gsm8k_local"
        assert 0.0 <= res["scores"]["exact_match,flexible-extract"] <= 1.0
    assert (out / "report.md").exists()


def test_gsm8k_vllm_backend_needs_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    ckpt = tmp_path / "m"
    make_checkpoint.main(["synthetic", str(ckpt), "--layers", "1"])
    with pytest.raises(SystemExit):
        gsm8k.main(["--model", str(ckpt)])
