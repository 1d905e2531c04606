"""evals/vllm_log.py: vLLM's own load-time lines (as vLLM writes them) and this package's
lines about them (current and older forms), parsed from a log."""

import re

import pytest

from evals import startup_time, vllm_log
from vllm_logs import OLD_OURS, loading_line, ours_log, upstream_log, weights_line


def test_log_lines_are_vllms_own():
    assert weights_line(0.69).endswith("] Loading weights took 0.69 seconds")
    assert re.fullmatch(r"\(EngineCore_DP0 pid=4242\) INFO \d\d-\d\d \d\d:\d\d:\d\d "
                        r"\[gpu_model_runner\.py:\d+\] Model loading took 4\.2 GiB memory and "
                        r"9\.051234 seconds", loading_line("4.2", 9.051234))


def test_parse_vllm_logs():
    up = vllm_log.parse_log(upstream_log())
    assert up == {"loading_gib": 4.2, "loading_s": 9.051234, "weights_s": 0.69,
                  "prep_s": pytest.approx(8.361234)}
    ours = vllm_log.parse_log(ours_log())
    assert ours["ours_layers"] == 144 and ours["ours_prep_s"] == 0.151
    assert ours["ours_moe_layers"] == 48 and ours["ours_experts"] == 6144
    assert ours["ours_timing"] == "per-layer"
    assert ours["prep_s"] == pytest.approx(2.47)


def test_the_expert_loading_line_is_parsed_and_shown_below_the_table():
    """The MoE method's own line (written by the package's formatter) splits
    the expert tensors' time out of vLLM's "Loading weights"."""
    from vllm_w4a8_fastprep.load_stats import format_expert_loading

    line = "INFO 12-03 21:38:14 [moe.py:475] " + format_expert_loading(55296, 3.456, 1.25)
    ours = vllm_log.parse_log(ours_log() + line + "\n")
    assert (ours["ours_expert_tensors"], ours["ours_expert_load_s"],
            ours["ours_expert_send_s"]) == (55296, 3.46, 1.25)
    assert "ours_expert_load_s" not in vllm_log.parse_log(ours_log())
    text = startup_time.table(startup_time.summarize({"upstream": [vllm_log.parse_log(
        upstream_log())], "ours": [ours]}))
    assert ("\n\nours: MoE expert tensors in the method's weight loader 3.46 s of the weights' "
            "time; sending staged ones 1.25 s\n") in text
    off = vllm_log.parse_log(ours_log() + "INFO [moe.py:475] "
                                 + format_expert_loading(9, 0.5, None) + "\n")
    assert off["ours_expert_send_s"] is None
    text = startup_time.table(startup_time.summarize({"ours": [off]}))
    assert "ours: MoE expert tensors in the method's weight loader 0.50 s of the weights' time\n" \
        in text + "\n"


def test_parse_older_summary_line():
    old = vllm_log.parse_log(upstream_log() + OLD_OURS + "\n")
    assert old["ours_layers"] == 128 and old["ours_prep_s"] == 0.036
    assert old["ours_timing"] == "wall-span"


def test_the_lines_a_gsm8k_run_keeps_from_its_log():
    log = ("INFO 11-25 12:03:10 [default_loader.py:431] Loading weights took 0.52 seconds\n"
           "INFO 11-25 12:03:11 [load_stats.py:184] w4a8_fastprep: prepared 196 dense layers "
           "(0.61 GiB int4 + 0.02 GiB scales): 0.012 s of GPU time on cuda:0 (this package's "
           "preparation only, summed per layer)\n"
           "INFO 11-25 12:03:12 [gpu_model_runner.py:5348] Model loading took 1.1 GiB memory "
           "and 3.250000 seconds\n")
    load = vllm_log.parse_log(log)
    assert load["loading_s"] == 3.25 and load["weights_s"] == 0.52
    assert load["ours_layers"] == 196 and load["ours_prep_s"] == 0.012
    assert [x.split(" took")[0] for x in vllm_log.LOG_LINES.findall(log)] == [
        "Loading weights", "w4a8_fastprep: prepared 196 dense layers (0.61 GiB int4 + 0.02 GiB "
        "scales): 0.012 s of GPU time on cuda:0 (this package's preparation only, summed per "
        "layer)", "Model loading"]
    assert "ours_layers" not in vllm_log.parse_log(log.splitlines()[0])
