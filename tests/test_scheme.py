"""Our layer scheme inside vLLM's own Linear layers (column-, row-parallel,
merged qkv and gate_up), loaded through vLLM's weight loaders. Without an
SM90 GPU the layers take the dequantised fallback, whose forward must equal a
dense float reference; the same tests run the CUTLASS path on an H100."""

import logging
import socket

import pytest
import torch

pytest.importorskip("vllm")

from vllm_w4a8_fastprep import reference as ref  # noqa: E402
from vllm_w4a8_fastprep.synthetic import quantization_config, random_w4afp8_linear  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_ctx():
    import vllm_w4a8_fastprep

    vllm_w4a8_fastprep.register()
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    vc = VllmConfig(device_config=DeviceConfig(device=device))
    with set_current_vllm_config(vc):
        init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                     distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
                                     backend="gloo" if device == "cpu" else "nccl")
        initialize_model_parallel(1, 1)
        yield torch.device(device)
        destroy_model_parallel()
        destroy_distributed_environment()


def _quant_config():
    from vllm_w4a8_fastprep.config import W4A8FastPrepConfig

    return W4A8FastPrepConfig.from_config(quantization_config())


def _load(layer, tensors: dict, shard_id=None):
    for name, t in tensors.items():
        param = getattr(layer, name)
        if shard_id is None:
            param.weight_loader(param, t)
        else:
            param.weight_loader(param, t, shard_id)


def _prepare(layer):
    layer.quant_method.process_weights_after_loading(layer)


def _dense(parts):
    return torch.cat([ref.dequantize_weight(p["weight_packed"], p["weight_scale"]) for p in parts])


def _check_forward(layer, dense_w, device, bias=None):
    x = torch.randn(5, dense_w.shape[1], dtype=torch.bfloat16, device=device)
    out = layer(x)
    out = out[0] if isinstance(out, tuple) else out
    want = torch.nn.functional.linear(x.float(), dense_w.to(device), bias)
    rel = ((out.float() - want).norm() / want.norm()).item()
    # fallback: bf16 weights and activations; CUTLASS: fp8 activations and scales
    assert rel < (0.08 if layer.scheme.kernel is not None else 0.02), rel
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
    _check_forward(col, _dense([wc]), vllm_ctx)
    _check_forward(row, _dense([wr]), vllm_ctx)


def test_merged_qkv_and_gate_up(vllm_ctx):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    g = torch.Generator().manual_seed(2)
    qc = _quant_config()
    hidden, head, heads, kv = 256, 64, 4, 2
    qkv = QKVParallelLinear(hidden, head, heads, kv, bias=False, quant_config=qc,
                            prefix="l0.self_attn.qkv_proj",
                            params_dtype=torch.bfloat16).to(vllm_ctx)
    parts = {"q": random_w4afp8_linear(heads * head, hidden, g),
             "k": random_w4afp8_linear(kv * head, hidden, g),
             "v": random_w4afp8_linear(kv * head, hidden, g)}
    for sid, t in parts.items():
        _load(qkv, {k: v for k, v in t.items() if k != "weight_shape"}, sid)
    _prepare(qkv)
    _check_forward(qkv, _dense([parts["q"], parts["k"], parts["v"]]), vllm_ctx)

    gu = MergedColumnParallelLinear(hidden, [512, 512], bias=False, quant_config=qc,
                                    prefix="l0.mlp.gate_up_proj",
                                    params_dtype=torch.bfloat16).to(vllm_ctx)
    gate, up = random_w4afp8_linear(512, hidden, g), random_w4afp8_linear(512, hidden, g)
    for sid, t in ((0, gate), (1, up)):
        _load(gu, {k: v for k, v in t.items() if k != "weight_shape"}, sid)
    _prepare(gu)
    _check_forward(gu, _dense([gate, up]), vllm_ctx)


def test_wrong_shape_is_refused(vllm_ctx):
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    layer = ColumnParallelLinear(256, 384, bias=False, quant_config=_quant_config(),
                                 prefix="l0.bad", params_dtype=torch.bfloat16)
    bad = random_w4afp8_linear(256, 256, torch.Generator().manual_seed(3))  # N 256, not 384
    with pytest.raises((AssertionError, RuntimeError, ValueError)):
        _load(layer, bad)


def test_one_info_line_per_model_load(vllm_ctx):
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("vllm.w4a8_fastprep")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        qc = _quant_config()
        g = torch.Generator().manual_seed(4)
        layers = [ColumnParallelLinear(256, 256, bias=False, quant_config=qc, prefix=f"l{i}.p",
                                       params_dtype=torch.bfloat16).to(vllm_ctx) for i in range(3)]
        for layer in layers:
            _load(layer, random_w4afp8_linear(256, 256, g))
        for layer in layers[:2]:
            _prepare(layer)
        assert not [r for r in records if "prepared" in r.getMessage()]
        _prepare(layers[2])
        lines = [r.getMessage() for r in records if "prepared" in r.getMessage()]
        assert len(lines) == 1 and lines[0].startswith("w4a8_fastprep: prepared 3 dense layers ("), lines
        assert qc.load_stats.last_summary["layers"] == 3
        assert qc.load_stats.last_summary["seconds"] > 0
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
