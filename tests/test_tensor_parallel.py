"""Tensor-parallel shards (TP=2, two CPU processes, gloo): vLLM's weight
loaders cut our checkpoint tensors per rank -- column-parallel by N,
row-parallel by K and by the K/128 scale groups, including a K shard that is an
odd multiple of 128 -- and each rank's layer computes its slice of the dense
reference. Per-rank partial results only (no collectives in the forward)."""

import socket
import sys

import pytest
import torch

pytest.importorskip("vllm")

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, results):
    import vllm_w4a8_fastprep

    vllm_w4a8_fastprep.register()
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear

    from vllm_w4a8_fastprep import reference as ref
    from vllm_w4a8_fastprep.config import W4A8FastPrepConfig
    from vllm_w4a8_fastprep.synthetic import quantization_config, random_w4afp8_linear

    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        init_distributed_environment(world_size=WORLD, rank=rank, local_rank=rank,
                                     distributed_init_method=f"tcp://127.0.0.1:{port}",
                                     backend="gloo")
        initialize_model_parallel(WORLD, 1)
        qc = W4A8FastPrepConfig.from_config(quantization_config())
        g = torch.Generator().manual_seed(7)  # same full tensors on every rank
        n, k = 512, 768  # column: N/2 = 256 per rank; row: K/2 = 384 = 3 x 128 per rank
        wc, wr = random_w4afp8_linear(n, k, g), random_w4afp8_linear(k, n * 3 // 2, g)
        x = torch.randn(3, k, generator=g).to(torch.bfloat16)
        col = ColumnParallelLinear(k, n, bias=False, gather_output=False, quant_config=qc,
                                   prefix="col", params_dtype=torch.bfloat16)
        row = RowParallelLinear(n * 3 // 2, k, bias=False, input_is_parallel=True,
                                reduce_results=False, quant_config=qc, prefix="row",
                                params_dtype=torch.bfloat16)
        for layer, tensors in ((col, wc), (row, wr)):
            for name, t in tensors.items():
                getattr(layer, name).weight_loader(getattr(layer, name), t)
            layer.quant_method.process_weights_after_loading(layer)
        # column: this rank's N slice
        out_c = col(x)[0].float()
        dense_c = ref.dequantize_weight(wc["weight_packed"], wc["weight_scale"])
        want_c = x.float() @ dense_c[rank * n // 2:(rank + 1) * n // 2].t()
        # row: this rank's K slice of input and weight (and of the scale groups)
        kr = n * 3 // 2 // WORLD
        xr = torch.randn(3, n * 3 // 2, generator=g).to(torch.bfloat16)
        out_r = row(xr[:, rank * kr:(rank + 1) * kr])[0].float()
        dense_r = ref.dequantize_weight(wr["weight_packed"], wr["weight_scale"])
        want_r = xr.float()[:, rank * kr:(rank + 1) * kr] @ dense_r[:, rank * kr:(rank + 1) * kr].t()
        rel = [((o - w).norm() / w.norm()).item() for o, w in ((out_c, want_c), (out_r, want_r))]
        results.put((rank, rel, tuple(col.weight_dequantized.shape),
                     tuple(row.weight_dequantized.shape), tuple(row.weight_scale.shape)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-process test (gloo)")
def test_tp2_shards_match_dense_slices():
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in range(WORLD)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, rel, col_shape, row_shape, row_scale_shape in got:
        assert col_shape == (256, 768), col_shape  # N/2 x K
        assert row_shape == (768, 384), row_shape  # N x K/2 (K/2 = 384: 3 groups)
        assert row_scale_shape == (768, 3), row_scale_shape
        assert max(rel) < 0.02, (rank, rel)
