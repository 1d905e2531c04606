"""The load summary: layers counted once each by what was prepared, a failed
layer still reported, dense and MoE layers apart, and the time of this
package's own preparation (per layer, not the wall span of the load)."""

import time

import pytest
import torch

from vllm_w4a8_fastprep.load_stats import PREFIX as SUMMARY
from vllm_w4a8_fastprep.load_stats import LoadStats, format_summary, parse_summary

MIB = 1 << 20


@pytest.fixture
def lines(log_lines):
    """Messages of the package logger, as the summary writes them."""
    return lambda: [r.getMessage() for r in log_lines if r.getMessage().startswith(SUMMARY)]


def _layer(stats, name, device="cpu", seconds=0.0, experts=0, fallback=False,
           weight=64 * MIB, scale=2 * MIB):
    token = stats.begin_layer(torch.device(device))
    if seconds:
        time.sleep(seconds)
    stats.end_layer(token, name, weight, scale, fallback=fallback, experts=experts)


def test_a_layer_prepared_twice_counts_once(lines):
    stats = LoadStats()
    stats.layer_created()
    stats.layer_created()
    _layer(stats, "l0.q")
    _layer(stats, "l0.q")  # prepared again: still one of two layers
    assert lines() == []
    _layer(stats, "l0.k")
    got = lines()
    assert len(got) == 1 and got[0].startswith("w4a8_fastprep: prepared 2 dense layers (0.12 GiB"), got
    assert "1 preparations of already prepared layers, counted once" in got[0]
    assert stats.last_summary["layers"] == 2
    assert stats.last_summary["weight_bytes"] == 2 * 64 * MIB


def test_a_failed_layer_does_not_suppress_the_summary(lines):
    stats = LoadStats()
    for _ in range(3):
        stats.layer_created()
    _layer(stats, "l0.q")
    token = stats.begin_layer(torch.device("cpu"))
    stats.layer_failed(token, "l0.k")  # the load stops here; l0.v is never prepared
    got = lines()
    assert len(got) == 1 and got[0].startswith("w4a8_fastprep: prepared 1 dense layers"), got
    assert got[0].endswith("; FAILED: l0.k"), got
    assert parse_summary(got[0])["failed"] == ["l0.k"]


def test_time_is_the_sum_of_the_layers_not_the_span(lines):
    stats = LoadStats()
    stats.layer_created()
    stats.layer_created()
    _layer(stats, "a", seconds=0.05)
    time.sleep(0.4)  # vLLM's own work between two of our layers
    _layer(stats, "b", seconds=0.05)
    s = stats.last_summary
    assert 0.1 <= s["seconds"] < 0.3, s  # the span would be >= 0.5
    assert s["cpu_seconds"] == s["seconds"] and s["gpu_seconds"] == 0
    assert "s of CPU time on cpu (this package's preparation only, summed per layer)" in lines()[0]


def test_moe_layers_and_experts_apart_from_dense(lines):
    stats = LoadStats()
    stats.layer_created()
    stats.layer_created(experts=128)
    stats.layer_created(experts=128)
    _layer(stats, "l0.qkv", weight=1 << 30, scale=1 << 25)
    _layer(stats, "l0.mlp.experts", experts=128, weight=3 << 29, scale=1 << 24)
    _layer(stats, "l1.mlp.experts", experts=128, weight=3 << 29, scale=1 << 24)
    got = lines()
    assert len(got) == 1, got
    assert got[0].startswith(
        "w4a8_fastprep: prepared 1 dense layers (1.00 GiB int4 + 0.03 GiB scales) and "
        "2 MoE layers (256 experts, 3.00 GiB int4 + 0.03 GiB scales): "), got
    p = parse_summary(got[0])
    assert (p["dense_layers"], p["moe_layers"], p["experts"], p["layers"]) == (1, 2, 256, 3)
    assert p["weight_gib"] == pytest.approx(4.0)


def test_fallback_layers_are_named_in_the_line(lines):
    stats = LoadStats()
    stats.layer_created()
    _layer(stats, "a", fallback=True)
    assert lines()[0].endswith("; 1 through the dequantised fallback")
    assert parse_summary(lines()[0])["fallback"] == 1


def test_flush_writes_what_was_prepared_so_far(lines):
    stats = LoadStats()
    for _ in range(4):
        stats.layer_created()
    assert stats.flush() is None and lines() == []  # nothing prepared: nothing written
    _layer(stats, "a")
    s = stats.flush()
    assert s["layers"] == 1 and len(lines()) == 1


def test_a_second_load_of_the_same_layers_is_summarised_again(lines):
    # weight reloading prepares every layer again: a second line, same counts
    stats = LoadStats()
    stats.layer_created()
    stats.layer_created()
    for _ in range(2):
        _layer(stats, "a")
        _layer(stats, "b")
    got = lines()
    assert len(got) == 2 and all("prepared 2 dense layers" in g for g in got), got


# ------------------------------------------------------------ parse_summary


def _summary(**kw):
    base = {"dense_layers": 96, "moe_layers": 0, "experts": 0,
            "dense_weight_bytes": int(1.2 * (1 << 30)), "dense_scale_bytes": int(0.04 * (1 << 30)),
            "moe_weight_bytes": 0, "moe_scale_bytes": 0, "fallback": 0, "repeats": 0,
            "failed": [], "gpu_seconds": 0.151, "cpu_seconds": 0.0, "device": "cuda:0"}
    base.update(kw)
    return base


@pytest.mark.parametrize("kw,want", [
    ({}, {"layers": 96, "dense_layers": 96, "moe_layers": 0, "seconds": 0.151,
          "device": "cuda:0", "timing": "per-layer"}),
    ({"moe_layers": 48, "experts": 6144, "moe_weight_bytes": int(14.1 * (1 << 30)),
      "moe_scale_bytes": int(0.44 * (1 << 30))},
     {"layers": 144, "moe_layers": 48, "experts": 6144, "weight_gib": 15.3}),
    ({"gpu_seconds": 0.0, "cpu_seconds": 2.5, "device": "cpu", "fallback": 3},
     {"seconds": 2.5, "cpu_seconds": 2.5, "device": "cpu", "fallback": 3}),
    ({"gpu_seconds": 0.2, "cpu_seconds": 0.5, "repeats": 2, "failed": ["a", "b.c"]},
     {"seconds": 0.7, "gpu_seconds": 0.2, "failed": ["a", "b.c"]}),
])
def test_parse_summary_reads_the_line_back(kw, want):
    line = format_summary(_summary(**kw))
    got = parse_summary(f"INFO 01-01 00:00:00 [load_stats.py:1] {line}\nINFO next line\n")
    assert got is not None, line
    for k, v in want.items():
        assert got[k] == pytest.approx(v), (k, got, line)


def test_parse_summary_reads_the_older_line_and_takes_the_last():
    log = ("w4a8_fastprep: prepared 128 layers (3.25 GiB int4 + 0.10 GiB scales) in 0.036 s on "
           "cuda:0\n" + format_summary(_summary(dense_layers=7)) + "\n")
    assert parse_summary(log)["dense_layers"] == 7
    old = parse_summary("x w4a8_fastprep: prepared 128 layers (3.25 GiB int4 + 0.10 GiB scales) "
                        "in 0.036 s on cuda:0, 2 through the dequantised fallback\n")
    assert old["layers"] == 128 and old["seconds"] == 0.036 and old["timing"] == "wall-span"
    assert old["fallback"] == 2 and old["device"] == "cuda:0"


def test_parse_summary_without_a_line_is_none():
    assert parse_summary("INFO Loading weights took 1.00 seconds\n") is None


# --------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_time_excludes_work_between_layers_and_waits_once(lines):
    stats = LoadStats()
    stats.layer_created()
    stats.layer_created()
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize()
    token = stats.begin_layer(dev)
    torch.cuda._sleep(200_000_000)  # ~0.1 s or more of GPU work inside layer a
    t0 = time.perf_counter()
    stats.end_layer(token, "a", 1, 1)
    returned_after = time.perf_counter() - t0
    assert returned_after < 0.05, "end_layer waited for the GPU (a sync per layer)"
    torch.cuda._sleep(1_000_000_000)  # vLLM's own GPU work between our layers
    token = stats.begin_layer(dev)
    stats.end_layer(token, "b", 1, 1)
    s = stats.last_summary
    inside = s["per_layer_seconds"]["a"]
    assert inside > 0.02 and s["gpu_seconds"] < 3 * inside, s
    assert f"s of GPU time on {dev}" in lines()[0]


def test_the_expert_loading_line_reads_back():
    from vllm_w4a8_fastprep.load_stats import format_expert_loading, parse_expert_loading

    text = "x\n" + format_expert_loading(12, 0.5, 0.0) + "\n" + format_expert_loading(
        55296, 3.456, 1.25) + "\n"
    assert parse_expert_loading(text) == {"calls": 55296, "load_s": 3.46, "send_s": 1.25}
    unstaged = format_expert_loading(7, 0.25, None)  # staging off: nothing said of it
    assert unstaged.endswith("loader in 0.25 s") and "staged" not in unstaged
    assert parse_expert_loading(text + unstaged) == {"calls": 7, "load_s": 0.25, "send_s": None}
    assert parse_expert_loading("w4a8_fastprep: prepared 1 dense layers") is None


def test_the_block_load_line_reads_back():
    from vllm_w4a8_fastprep.load_stats import format_block_load, parse_block_load

    line = format_block_load(55296, 48, 15 << 30, 60, 1.234)
    assert line == ("w4a8_fastprep: load format w4a8_fastprep: 55296 MoE expert tensors of 48 "
                    "layers (15.00 GiB) read from the safetensors files in 60 pieces and put in "
                    "place in 1.23 s")
    text = "x\n" + format_block_load(9, 1, 1 << 20, 1, 0.5) + "\n" + line + "\n"
    assert parse_block_load(text) == {"tensors": 55296, "layers": 48, "gib": 15.0,
                                      "pieces": 60, "seconds": 1.23, "waited": None}
    assert parse_block_load("w4a8_fastprep: prepared 1 dense layers") is None
    beside = format_block_load(55296, 48, 15 << 30, 60, 2.5, waited=0.0449)
    assert beside == line.replace("in 1.23 s", "in 2.50 s") + (
        ", beside the other tensors (then waited for: 0.04 s)")
    assert parse_block_load(text + beside + "\n") == {
        "tensors": 55296, "layers": 48, "gib": 15.0, "pieces": 60, "seconds": 2.5,
        "waited": 0.04}
