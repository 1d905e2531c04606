"""Tensor-parallel shards (TP=2, two processes): vLLM's weight loaders cut our
checkpoint tensors per rank -- column-parallel by N, row-parallel by K and by
the K/128 scale groups (a K shard that is an odd multiple of 128), qkv with
the kv head replicated on both ranks -- the loaded-tensor checks accept the
shards (the checkpoint's full shapes and weight_shape), and each rank's layer
computes W4A8 of its slice (``w4a8_math``, float64 from the format's
definition). Per-rank partial results only (no collectives in the forward).

Two variants: CPU processes with gloo (the fallback; machines without a GPU)
and two GPUs with NCCL (on H100s the CUTLASS path, whose prepared weights
and scales are also compared byte for byte with vLLM's own chain on each
rank's shard)."""

import socket

import pytest
import ranks
import torch
from must_run import everything_must_run_here, import_or_skip, skip_or_fail

import_or_skip("vllm")

WORLD = 2
N, K = 512, 768  # column: N/2 = 256 per rank; row (K x 3/2 inputs): 384 = 3 x 128 per rank
HEADS, KV_HEADS, HEAD = 4, 1, 128  # qkv: q split, the single kv head replicated


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(out: torch.Tensor, want: torch.Tensor, fallback: bool) -> float:
    """0/1 for the fallback on the CPU (W4A8 exactly, rounded once to bf16),
    else the relative error (CUTLASS: fp8 accumulation; a GPU's activation
    quantisation may round a scale differently from w4a8_math's CPU formula)."""
    exact = fallback and out.device.type == "cpu"
    out = out.double().cpu()
    if exact:
        tol = 2.0 ** -8 * want.abs() + 1e-6 * want.abs().max()
        return 0.0 if ((out - want).abs() <= tol).all() else 1.0
    return ((out - want).norm() / want.norm()).item()


def _rank_main(rank: int, port: int, device: str, oracle_path, results):
    import w4a8_math
    import vllm_w4a8_fastprep

    vllm_w4a8_fastprep.register()
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )

    from vllm_w4a8_fastprep.config import W4A8FastPrepConfig
    from vllm_w4a8_fastprep.tools.synthetic import quantization_config, random_w4afp8_linear

    if device == "cuda":
        torch.cuda.set_device(rank)
        if oracle_path is not None and not hasattr(torch.ops._C, "cutlass_w4a8_mm"):
            from vllm_w4a8_fastprep.tools import vllm_ops as oracle

            oracle.load(oracle_path)
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device=device))):
        init_distributed_environment(world_size=WORLD, rank=rank, local_rank=rank,
                                     distributed_init_method=f"tcp://127.0.0.1:{port}",
                                     backend="gloo" if device == "cpu" else "nccl")
        initialize_model_parallel(WORLD, 1)
        qc = W4A8FastPrepConfig.from_config(quantization_config())
        g = torch.Generator().manual_seed(7)  # same full tensors on every rank
        kr_full = N * 3 // 2
        wc, wr = random_w4afp8_linear(N, K, g), random_w4afp8_linear(K, kr_full, g)
        wq = {s: random_w4afp8_linear(n, K, g) for s, n in
              (("q", HEADS * HEAD), ("k", KV_HEADS * HEAD), ("v", KV_HEADS * HEAD))}
        x = torch.randn(3, K, generator=g).to(torch.bfloat16)
        xr = torch.randn(3, kr_full, generator=g).to(torch.bfloat16)
        col = ColumnParallelLinear(K, N, bias=False, gather_output=False, quant_config=qc,
                                   prefix="col", params_dtype=torch.bfloat16).to(dev)
        row = RowParallelLinear(kr_full, K, bias=False, input_is_parallel=True,
                                reduce_results=False, quant_config=qc, prefix="row",
                                params_dtype=torch.bfloat16).to(dev)
        qkv = QKVParallelLinear(K, HEAD, HEADS, KV_HEADS, bias=False, quant_config=qc,
                                prefix="qkv", params_dtype=torch.bfloat16).to(dev)
        for layer, tensors in ((col, wc), (row, wr)):
            for name, t in tensors.items():
                getattr(layer, name).weight_loader(getattr(layer, name), t)
        for sid, tensors in wq.items():
            for name, t in tensors.items():
                getattr(qkv, name).weight_loader(getattr(qkv, name), t, sid)

        # this rank's checkpoint slices, as vLLM's loaders cut them
        nc, kr = N // WORLD, kr_full // WORLD
        rows = slice(rank * nc, (rank + 1) * nc)
        cols8, cols128 = slice(rank * kr // 8, (rank + 1) * kr // 8), \
            slice(rank * kr // 128, (rank + 1) * kr // 128)
        qrows = slice(rank * HEADS * HEAD // WORLD, (rank + 1) * HEADS * HEAD // WORLD)
        shards = {
            "col": [(wc["weight_packed"][rows], wc["weight_scale"][rows])],
            "row": [(wr["weight_packed"][:, cols8], wr["weight_scale"][:, cols128])],
            "qkv": [(wq["q"]["weight_packed"][qrows], wq["q"]["weight_scale"][qrows]),
                    (wq["k"]["weight_packed"], wq["k"]["weight_scale"]),
                    (wq["v"]["weight_packed"], wq["v"]["weight_scale"])],
        }
        bytes_equal = {}
        for name, layer in (("col", col), ("row", row), ("qkv", qkv)):
            layer.quant_method.process_weights_after_loading(layer)
            if layer.scheme.kernel is not None and oracle_path is not None:
                bytes_equal[name] = _same_as_upstream(layer, shards[name])
        fallback = col.scheme.kernel is None
        xs = xr[:, rank * kr:(rank + 1) * kr]
        rel = [_rel(col(x.to(dev))[0], w4a8_math.w4a8_linear(x, shards["col"]), fallback),
               _rel(row(xs.to(dev))[0], w4a8_math.w4a8_linear(xs, shards["row"]), fallback),
               _rel(qkv(x.to(dev))[0], w4a8_math.w4a8_linear(x, shards["qkv"]), fallback)]
        out_n = [col.scheme.output_partition_sizes, row.scheme.output_partition_sizes,
                 qkv.scheme.output_partition_sizes]
        results.put((rank, fallback, rel, out_n, bytes_equal))


def _same_as_upstream(layer, parts) -> bool:
    """The rank's prepared weight and scales == vLLM's chain on its shard."""
    from vllm_w4a8_fastprep.tools import upstream

    vllm_ops = torch.ops._C
    dev = layer.weight_packed.device
    packed = torch.cat([p for p, _ in parts]).to(dev)
    scale = torch.cat([s for _, s in parts]).to(dev)
    # vLLM's own QuantFP8, on the forward the layer's own QuantFP8 took
    quant = upstream.quant_fp8(upstream.forward_path(layer.scheme.kernel.quant_fp8))
    w = upstream.weight(vllm_ops, packed)
    s, c = upstream.scales(vllm_ops, quant, scale)
    return (torch.equal(layer.weight_packed.view(torch.uint8), w.view(torch.uint8))
            and torch.equal(layer.weight_scale.view(torch.uint8), s.view(torch.uint8))
            and torch.equal(layer.weight_chan_scale, c))


def _run_ranks(device: str, oracle_path=None):
    ctx = ranks.context()  # forked from a server that has imported vLLM
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, device, oracle_path, results))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    got = [results.get(timeout=600) for _ in range(WORLD)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return sorted(got)


def _check(got, want_fallback: bool | None):
    assert [r for r, *_ in got] == list(range(WORLD))
    for rank, fallback, rel, out_n, _ in got:
        if want_fallback is not None:
            assert fallback == want_fallback, (rank, fallback)
        assert out_n == [[N // 2], [K], [HEADS * HEAD // 2, HEAD, HEAD]], out_n
        assert max(rel) < 5e-3, (rank, rel)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CPU processes need vLLM's CPU platform; with a GPU the GPU variant "
                           "(test_tp2_shards_on_two_gpus) runs instead")
def test_tp2_shards_on_cpu_processes():
    _check(_run_ranks("cpu"), want_fallback=True)


@pytest.mark.gpu
def test_tp2_shards_on_two_gpus():
    if torch.cuda.device_count() < WORLD:
        # a hardware limit, not something to install: a skip even where everything must run
        pytest.skip(f"tensor parallelism over {WORLD} GPUs needs {WORLD} GPUs in this machine; "
                    f"this one has {torch.cuda.device_count()}")
    from vllm_w4a8_fastprep.tools import vllm_ops as oracle

    path = oracle.find_oracle()
    if path is None and everything_must_run_here():
        skip_or_fail(f"upstream vLLM ops library not found ({oracle.searched()}): the ranks' "
                     "bytes cannot be compared with vLLM's chain",
                     oracle.PROVIDE)
    got = _run_ranks("cuda", str(path) if path else None)
    hopper = torch.cuda.get_device_capability() == (9, 0)
    _check(got, want_fallback=None if path is None else not hopper)
    for rank, fallback, _, _, bytes_equal in got:
        if not fallback and path is not None:
            assert bytes_equal == {"col": True, "row": True, "qkv": True}, (rank, bytes_equal)
