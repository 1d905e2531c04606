"""Our layer scheme inside vLLM's own Linear layers (column-, row-parallel,
merged qkv and gate_up), loaded through vLLM's weight loaders.

Outputs are compared with W4A8 computed from the format's definition in
float64 (``w4a8_math``, not the package's code): without an SM90 GPU the
layers take the fallback, which must equal it up to fp32 accumulation and
the final rounding; on an H100 the CUTLASS path, up to its fp8 accumulation.
Layers whose tensors were not all loaded, or not with the layer's shapes,
are refused by name."""

import logging
import socket

import pytest
import torch

pytest.importorskip("vllm")

import w4a8_math  # noqa: E402

from vllm_w4a8_fastprep.load_stats import PREFIX as SUMMARY  # noqa: E402
from vllm_w4a8_fastprep.tools.synthetic import quantization_config, random_w4afp8_linear  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def _quant_config():
    from vllm_w4a8_fastprep.config import W4A8FastPrepConfig

    return W4A8FastPrepConfig.from_config(quantization_config())


def _load(layer, tensors: dict, shard_id=None, skip=()):
    for name, t in tensors.items():
        if name in skip:
            continue
        param = getattr(layer, name)
        if shard_id is None:
            param.weight_loader(param, t)
        else:
            param.weight_loader(param, t, shard_id)


def _prepare(layer):
    layer.quant_method.process_weights_after_loading(layer)


def _parts(*tensors):
    return [(t["weight_packed"], t["weight_scale"]) for t in tensors]


def _check_forward(layer, parts, device):
    k = parts[0][0].shape[1] * 8
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    out = layer(x.to(device))
    out = (out[0] if isinstance(out, tuple) else out).double().cpu()
    want = w4a8_math.w4a8_linear(x, parts)
    dense = w4a8_math.dense_linear(x, parts)
    if layer.scheme.kernel is None and device.type == "cpu":
        # the fallback: W4A8's math exactly, rounded once to bf16 (2^-8 relative)
        tol = 2.0 ** -8 * want.abs() + 1e-6 * want.abs().max()
        assert ((out - want).abs() <= tol).all(), (out - want).abs().max()
    else:  # CUTLASS: fp8 tensor-core accumulation; on a GPU vLLM's activation
        # quantisation may round a scale differently from w4a8_math's CPU formula
        rel = ((out - want).norm() / want.norm()).item()
        assert rel < 5e-3, rel
    # and W4A8 is not the dense bf16 model (fp8 activations and scales)
    assert ((dense - want).norm() / want.norm()).item() > 5e-3
    return out


def test_column_and_row_parallel(vllm_ctx):
    from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear

    g = torch.Generator().manual_seed(1)
    qc = _quant_config()
    col = ColumnParallelLinear(256, 384, bias=False, quant_config=qc, prefix="l0.mlp.up_proj",
                               params_dtype=torch.bfloat16).to(vllm_ctx)
    row = RowParallelLinear(384, 256, bias=False, quant_config=qc, prefix="l0.mlp.down_proj",
                            params_dtype=torch.bfloat16).to(vllm_ctx)
    wc, wr = random_w4afp8_linear(384, 256, g), random_w4afp8_linear(256, 384, g)
    _load(col, wc)
    _load(row, wr)
    _prepare(col)
    _prepare(row)
    _check_forward(col, _parts(wc), vllm_ctx)
    _check_forward(row, _parts(wr), vllm_ctx)


def _qkv(qc, device, hidden=256, head=64, heads=4, kv=2):
    from vllm.model_executor.layers.linear import QKVParallelLinear

    return QKVParallelLinear(hidden, head, heads, kv, bias=False, quant_config=qc,
                             prefix="l0.self_attn.qkv_proj",
                             params_dtype=torch.bfloat16).to(device)


def _gate_up(qc, device, hidden=256, inter=512):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    return MergedColumnParallelLinear(hidden, [inter, inter], bias=False, quant_config=qc,
                                      prefix="l0.mlp.gate_up_proj",
                                      params_dtype=torch.bfloat16).to(device)


def test_merged_qkv_and_gate_up(vllm_ctx):
    g = torch.Generator().manual_seed(2)
    qc = _quant_config()
    qkv = _qkv(qc, vllm_ctx)
    parts = {"q": random_w4afp8_linear(256, 256, g), "k": random_w4afp8_linear(128, 256, g),
             "v": random_w4afp8_linear(128, 256, g)}
    for sid, t in parts.items():
        _load(qkv, t, sid)  # weight_shape too: one per shard, as checkpoints have
    _prepare(qkv)
    _check_forward(qkv, _parts(parts["q"], parts["k"], parts["v"]), vllm_ctx)

    gu = _gate_up(qc, vllm_ctx)
    gate, up = random_w4afp8_linear(512, 256, g), random_w4afp8_linear(512, 256, g)
    for sid, t in ((0, gate), (1, up)):
        _load(gu, t, sid)
    _prepare(gu)
    _check_forward(gu, _parts(gate, up), vllm_ctx)


def test_gate_up_fused_on_disk(vllm_ctx):
    # one checkpoint tensor for both halves (Phi-3 style): no shard id
    g = torch.Generator().manual_seed(12)
    gu = _gate_up(_quant_config(), vllm_ctx)
    fused = random_w4afp8_linear(1024, 256, g)
    _load(gu, fused)
    _prepare(gu)
    _check_forward(gu, _parts(fused), vllm_ctx)


def test_wrong_shape_is_refused(vllm_ctx):
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    from vllm_w4a8_fastprep.load_checks import LoadError

    layer = ColumnParallelLinear(256, 384, bias=False, quant_config=_quant_config(),
                                 prefix="l0.bad", params_dtype=torch.bfloat16)
    bad = random_w4afp8_linear(256, 256, torch.Generator().manual_seed(3))  # N 256, not 384
    _load(layer, bad)  # not loaded: vLLM's loader would stop at a bare assert
    with pytest.raises(LoadError, match=r"layer l0\.bad cannot be served: checkpoint "
                                        r"weight_packed has shape \[256, 32\], the layer needs "
                                        r"\[384, 32\]"):
        _prepare(layer)


def test_mis_shaped_tensors_of_several_layers_are_one_error_before_vllms_asserts(vllm_ctx):
    """A weight_scale with groups of 64 (K/64 columns) went to vLLM's loader,
    which stopped at a bare ``AssertionError: ''``: now no tensor that does
    not fit reaches it, and the first layer prepared names every bad tensor
    of every layer, with both shapes. Also for tensors whose data cannot be
    read here (meta: only the shape is looked at)."""
    from vllm_w4a8_fastprep.load_checks import LoadError

    qc = _quant_config()
    g = torch.Generator().manual_seed(13)
    a, b = _col(vllm_ctx, name="l5.a", qc=qc), _col(vllm_ctx, name="l5.b", qc=qc)
    qkv = _qkv(qc, vllm_ctx)
    ta = random_w4afp8_linear(384, 256, g)
    ta["weight_scale"] = torch.ones(384, 256 // 64, dtype=torch.bfloat16)
    _load(a, ta)
    tb = random_w4afp8_linear(384, 256, g)
    tb["weight_packed"] = torch.empty(384, 16, dtype=torch.int32, device="meta")
    _load(b, tb)
    for sid, n in (("q", 256), ("k", 128), ("v", 128)):
        _load(qkv, random_w4afp8_linear(n if sid != "k" else 256, 256, g), sid)
    with pytest.raises(LoadError) as err:
        _prepare(a)
    text = str(err.value)
    assert text.startswith("w4a8_fastprep: layer l5.a cannot be served: checkpoint weight_scale "
                           "has shape [384, 4], the layer needs [384, 2]"), text
    assert "layer l5.b: checkpoint weight_packed has shape [384, 16], the layer needs " \
           "[384, 32]" in text, text
    assert "layer l0.self_attn.qkv_proj: checkpoint weight_packed (shard k) has shape " \
           "[256, 32], the layer needs [128, 32]" in text, text
    assert "\n" not in text


# ------------------------------------------- tensors never loaded, or wrong


def _col(device, n=384, k=256, name="l3.mlp.up_proj", qc=None):
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    return ColumnParallelLinear(k, n, bias=False, quant_config=qc or _quant_config(),
                                prefix=name, params_dtype=torch.bfloat16).to(device)


@pytest.mark.parametrize("missing", ["weight_scale", "weight_packed"])
def test_a_tensor_never_loaded_is_refused_by_name(vllm_ctx, missing):
    layer = _col(vllm_ctx)
    _load(layer, random_w4afp8_linear(384, 256, torch.Generator().manual_seed(4)),
          skip=(missing,))
    with pytest.raises(ValueError, match=rf"layer l3\.mlp\.up_proj .*{missing} was never loaded"):
        _prepare(layer)


def test_a_weight_shape_that_is_not_the_layer_is_refused(vllm_ctx):
    layer = _col(vllm_ctx)
    t = random_w4afp8_linear(384, 256, torch.Generator().manual_seed(5))
    t["weight_shape"] = torch.tensor([999, 7])
    _load(layer, t)
    with pytest.raises(ValueError, match=r"l3\.mlp\.up_proj.*weight_shape is \[999, 7\], the "
                                         r"layer is \[N, K\] = \[384, 256\]"):
        _prepare(layer)


def test_a_larger_checkpoint_tensor_silently_cut_is_refused(vllm_ctx):
    # vLLM's column loader narrows a bigger tensor to the layer's rows
    layer = _col(vllm_ctx)
    _load(layer, random_w4afp8_linear(512, 256, torch.Generator().manual_seed(6)))
    with pytest.raises(ValueError, match=r"checkpoint weight_packed has shape \[512, 32\], the "
                                         r"layer needs \[384, 32\]"):
        _prepare(layer)


def test_a_merged_shard_never_loaded_is_refused(vllm_ctx):
    g = torch.Generator().manual_seed(7)
    qkv = _qkv(_quant_config(), vllm_ctx)
    _load(qkv, random_w4afp8_linear(256, 256, g), "q")
    _load(qkv, random_w4afp8_linear(128, 256, g), "k")
    with pytest.raises(ValueError, match=r"l0\.self_attn\.qkv_proj.*weight_packed was loaded for "
                                         r"shards \['k', 'q'\] but not for \['v'\]"):
        _prepare(qkv)
    gu = _gate_up(_quant_config(), vllm_ctx)
    _load(gu, random_w4afp8_linear(512, 256, g), 1, skip=("weight_scale",))
    _load(gu, random_w4afp8_linear(512, 256, g), 0)
    with pytest.raises(ValueError, match=r"weight_scale was loaded for shards \['0'\] but not "
                                         r"for \['1'\]"):
        _prepare(gu)


def test_a_shard_with_another_shards_shape_is_refused(vllm_ctx):
    g = torch.Generator().manual_seed(8)
    qkv = _qkv(_quant_config(), vllm_ctx)
    _load(qkv, random_w4afp8_linear(256, 256, g), "q")
    _load(qkv, random_w4afp8_linear(128, 256, g), "k")
    v = random_w4afp8_linear(128, 256, g)
    v["weight_shape"] = torch.tensor([256, 256])  # q's shape written into v
    _load(qkv, v, "v")
    with pytest.raises(ValueError, match=r"weight_shape \(shard v\) is \[256, 256\], the layer "
                                         r"is \[N, K\] = \[128, 256\]"):
        _prepare(qkv)


def test_a_refused_layer_still_writes_the_summary(vllm_ctx, log_lines):
    qc = _quant_config()
    good, bad = _col(vllm_ctx, name="l4.a", qc=qc), _col(vllm_ctx, name="l4.b", qc=qc)
    g = torch.Generator().manual_seed(9)
    _load(good, random_w4afp8_linear(384, 256, g))
    _load(bad, random_w4afp8_linear(384, 256, g), skip=("weight_scale",))
    _prepare(good)
    with pytest.raises(ValueError):
        _prepare(bad)
    lines = [r.getMessage() for r in log_lines if r.getMessage().startswith(SUMMARY)]
    assert len(lines) == 1 and lines[0].startswith("w4a8_fastprep: prepared 1 dense layers")
    assert lines[0].endswith("FAILED: l4.b"), lines


def test_dummy_load_format_loads_nothing_and_is_served(vllm_ctx):
    from vllm.config import DeviceConfig, LoadConfig, VllmConfig, set_current_vllm_config

    vc = VllmConfig(device_config=DeviceConfig(device=vllm_ctx.type),
                    load_config=LoadConfig(load_format="dummy"))
    with set_current_vllm_config(vc):
        layer = _col(vllm_ctx)
    layer.weight_packed.data.random_(-(2**31), 2**31 - 1)
    layer.weight_scale.data.fill_(1e-3)
    _prepare(layer)  # random weights by design: no loading check


# ------------------------------------------------------- the fallback layer


def test_fallback_frees_the_packed_tensors_and_warns_what_it_costs(vllm_ctx, log_lines,
                                                                   monkeypatch):
    from vllm_w4a8_fastprep import logs, scheme

    monkeypatch.setattr(logs, "_said", set())  # every notice said again
    if vllm_ctx.type == "cuda":  # the GPU would take the CUTLASS path: force the fallback
        monkeypatch.setattr(scheme, "hopper_kernel_problem", lambda config: "forced by the test")
    layer = _col(vllm_ctx)
    warnings = [r for r in log_lines if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in log_lines]
    msg = warnings[0].getMessage()
    why = "forced by the test" if vllm_ctx.type == "cuda" else "platform is "
    assert f"cannot serve l3.mlp.up_proj ({why}" in msg and "4x the memory" in msg, msg
    t = random_w4afp8_linear(384, 256, torch.Generator().manual_seed(10))
    _load(layer, t)
    _prepare(layer)
    names = {n for n, _ in layer.named_parameters()}
    assert "weight_packed" not in names and "weight_scale" not in names, names
    w = layer.weight_dequantized
    assert w.dtype == torch.bfloat16 and w.shape == (384, 256)
    assert torch.equal(w.to(torch.float8_e4m3fn).to(torch.bfloat16), w)  # fp8 values, exact
    assert w.numel() * w.element_size() == 4 * t["weight_packed"].numel() * 4
    want_w, want_c = w4a8_math.weight_w4a8(t["weight_packed"], t["weight_scale"])
    assert torch.equal(w.double().cpu(), want_w)
    assert torch.equal(layer.weight_chan_scale.double().cpu(), want_c)
    _check_forward(layer, _parts(t), vllm_ctx)


def test_one_info_line_per_model_load(vllm_ctx, log_lines):
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    qc = _quant_config()
    g = torch.Generator().manual_seed(4)
    layers = [ColumnParallelLinear(256, 256, bias=False, quant_config=qc, prefix=f"l{i}.p",
                                   params_dtype=torch.bfloat16).to(vllm_ctx) for i in range(3)]
    for layer in layers:
        _load(layer, random_w4afp8_linear(256, 256, g))
    for layer in layers[:2]:
        _prepare(layer)
    assert not [r for r in log_lines if r.getMessage().startswith(SUMMARY)]
    _prepare(layers[2])
    lines = [r.getMessage() for r in log_lines if r.getMessage().startswith(SUMMARY)]
    assert len(lines) == 1 and lines[0].startswith("w4a8_fastprep: prepared 3 dense layers ("), lines
    assert qc.load_stats.last_summary["layers"] == 3
    assert qc.load_stats.last_summary["seconds"] > 0


@pytest.mark.gpu
def test_fallback_equals_the_cutlass_path_on_hopper(vllm_ctx, monkeypatch):
    """The same layer through cutlass_w4a8_mm and through the fallback
    (forced): equal up to the GEMM's accumulation."""
    from vllm_w4a8_fastprep import scheme

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the CUTLASS W4A8 path needs SM90")
    g = torch.Generator().manual_seed(13)
    t = random_w4afp8_linear(1024, 2048, g)
    qc = _quant_config()
    cutlass = _col(vllm_ctx, n=1024, k=2048, name="l5.cutlass", qc=qc)
    monkeypatch.setattr(scheme, "hopper_kernel_problem", lambda config: "forced by the test")
    fallback = _col(vllm_ctx, n=1024, k=2048, name="l5.fallback", qc=qc)
    assert cutlass.scheme.kernel is not None and fallback.scheme.kernel is None
    for layer in (cutlass, fallback):
        _load(layer, t)
        _prepare(layer)
    x = torch.randn(64, 2048, generator=g).to(torch.bfloat16).to(vllm_ctx)
    a, b = cutlass(x)[0].double(), fallback(x)[0].double()
    rel = ((a - b).norm() / a.norm()).item()
    print(f"fallback vs cutlass_w4a8_mm: relative difference {rel:.3g}, "
          f"{(a != b).float().mean().item():.3%} of outputs differ")
    assert rel < 2e-3, rel


# ------------------------------------------------------ non-finite scales


def test_nan_and_inf_group_scales_are_counted_and_named_or_refused(vllm_ctx, log_lines,
                                                                  monkeypatch):
    """NaN/inf group scales give NaN outputs: counted on the device during
    preparation (per output channel), read at the summary's one host wait,
    one WARNING naming the layers; refused with
    VLLM_W4A8_FASTPREP_REFUSE_NONFINITE=1."""
    from vllm_w4a8_fastprep.load_checks import LoadError

    def load_two(qc, tag):
        a, b = _col(vllm_ctx, name=f"{tag}.a", qc=qc), _col(vllm_ctx, name=f"{tag}.b", qc=qc)
        g = torch.Generator().manual_seed(14)
        ta, tb = random_w4afp8_linear(384, 256, g), random_w4afp8_linear(384, 256, g)
        ta["weight_scale"][5, 1] = float("nan")
        ta["weight_scale"][7, 0] = float("inf")
        ta["weight_scale"][9, :] = -float("inf")
        _load(a, ta)
        _load(b, tb)
        return a, b

    qc = _quant_config()
    a, b = load_two(qc, "l6")
    _prepare(a)
    _prepare(b)
    s = qc.load_stats.last_summary
    assert s["nonfinite"] == {"l6.a": (3, 384)}
    warn = [r.getMessage() for r in log_lines if r.levelno == logging.WARNING
            and "NaN or infinite" in r.getMessage()]
    assert warn == ["w4a8_fastprep: 1 layers have NaN or infinite group scales in 3 output "
                    "channels: l6.a (3 of 384 output channels); the outputs of those channels "
                    "will be NaN; set VLLM_W4A8_FASTPREP_REFUSE_NONFINITE=1 to refuse such "
                    "checkpoints"], warn
    chan = a.weight_chan_scale.detach().cpu().reshape(-1)
    assert (~torch.isfinite(chan)).nonzero().reshape(-1).tolist() == [5, 7, 9]

    monkeypatch.setenv("VLLM_W4A8_FASTPREP_REFUSE_NONFINITE", "1")
    qc = _quant_config()
    a, b = load_two(qc, "l7")
    _prepare(a)
    with pytest.raises(LoadError, match=r"group scales in 3 output channels: l7\.a \(3 of 384 "
                                        r"output channels\); refused"):
        _prepare(b)


def test_a_weight_shape_of_another_shape_is_refused_without_vllms_assert(vllm_ctx):
    from vllm_w4a8_fastprep.load_checks import LoadError

    for bad in (torch.tensor([384, 256, 1]), torch.tensor([[384, 256]])):
        layer = _col(vllm_ctx, name=f"l8.{bad.dim()}")
        t = random_w4afp8_linear(384, 256, torch.Generator().manual_seed(15))
        t["weight_shape"] = bad
        _load(layer, t)  # vLLM's loader stopped at a bare AssertionError
        with pytest.raises(LoadError, match=rf"layer l8\.{bad.dim()} cannot be served: checkpoint "
                                            r"weight_shape has shape \[.*\], the layer needs \[2\]"):
            _prepare(layer)
