"""One table of model weight shapes: the Linear and MoE expert tensors that a
W4A8 checkpoint of each architecture holds, per tensor-parallel or
expert-parallel rank. The GPU tests, the benchmark, the sanitizer run, the
kernel geometry sweep and the synthetic presets all draw their shapes from it.

Shapes are named ``model/tensor@split``, e.g. ``llama3-70b/down@tp2``.
Dense shapes are ``(N, K)`` (N output features, K input features); MoE shapes
are ``(E, N, K)`` per layer and per rank (E local experts).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    hidden: int
    intermediate: int  # dense MLP (0: every MLP is MoE)
    heads: int
    kv_heads: int
    head_dim: int
    experts: int = 0  # routed experts per MoE layer (0: dense model)
    moe_intermediate: int = 0

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim


ARCHS: dict[str, Arch] = {
    "llama3-8b": Arch(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128),
    "llama3-70b": Arch(hidden=8192, intermediate=28672, heads=64, kv_heads=8, head_dim=128),
    "llama2-7b": Arch(hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128),
    "qwen2.5-1.5b": Arch(hidden=1536, intermediate=8960, heads=12, kv_heads=2, head_dim=128),
    "qwen2.5-0.5b": Arch(hidden=896, intermediate=4864, heads=14, kv_heads=2, head_dim=64),
    "qwen3-30b-a3b": Arch(hidden=2048, intermediate=0, heads=32, kv_heads=4, head_dim=128,
                          experts=128, moe_intermediate=768),
    "deepseek-v3": Arch(hidden=7168, intermediate=18432, heads=128, kv_heads=128,
                        head_dim=128, experts=256, moe_intermediate=2048),
}


def dense_shapes(model: str, tp: int = 1) -> dict[str, tuple[int, int]]:
    """``{name: (N, K)}`` of one decoder layer's Linears on one rank of ``tp``:
    column-parallel layers split N, row-parallel layers split K (as vLLM
    shards them). Attention is left out for MLA models (deepseek-v3)."""
    a = ARCHS[model]
    out: dict[str, tuple[int, int]] = {}
    if model != "deepseek-v3":
        qkv = a.q_size + 2 * a.kv_size
        out[f"{model}/qkv@tp{tp}"] = (qkv // tp, a.hidden)
        out[f"{model}/o@tp{tp}"] = (a.hidden, a.q_size // tp)
    if a.intermediate:
        out[f"{model}/gate_up@tp{tp}"] = (2 * a.intermediate // tp, a.hidden)
        out[f"{model}/down@tp{tp}"] = (a.hidden, a.intermediate // tp)
    return out


def moe_shapes(model: str, tp: int = 1, ep: int = 1) -> dict[str, tuple[int, int, int]]:
    """``{name: (E, N, K)}`` of one MoE layer's expert tensors on one rank:
    ``w13`` (gate and up stacked, N = 2I) and ``w2`` (N = H, K = I). Tensor
    parallelism splits the intermediate size, expert parallelism the experts."""
    a = ARCHS[model]
    if not a.experts:
        raise ValueError(f"{model} has no MoE layers")
    if a.experts % ep or a.moe_intermediate % tp:
        raise ValueError(f"{model}: ep={ep} / tp={tp} do not divide its experts / intermediate")
    e, i = a.experts // ep, a.moe_intermediate // tp
    split = f"ep{ep}" if ep > 1 else f"tp{tp}"
    return {
        f"{model}/w13@{split}": (e, 2 * i, a.hidden),
        f"{model}/w2@{split}": (e, a.hidden, i),
    }


def _merge(*tables: dict) -> dict:
    out: dict = {}
    for t in tables:
        out.update(t)
    return out


# Realistic dense layers for the kernel tests, sanitizer and benchmark.
DENSE = _merge(
    dense_shapes("llama3-8b"), dense_shapes("llama3-70b"), dense_shapes("llama3-70b", tp=8),
    dense_shapes("llama2-7b", tp=2),  # K = 5504: K % 256 == 128
    dense_shapes("qwen2.5-1.5b"), dense_shapes("qwen2.5-1.5b", tp=2),
    dense_shapes("qwen2.5-0.5b"),
)
# Layers of >= 100 MB of int4: where bandwidth is judged.
DENSE_LARGE = {name: s for name, s in DENSE.items() if s[0] * s[1] // 2 >= 100 << 20}
# Edge shapes: smallest legal sizes, both orders, K % 256 == 128, extreme aspect.
EDGE = {
    "edge/128x128": (128, 128), "edge/256x512": (256, 512), "edge/128x384": (128, 384),
    "edge/384x128": (384, 128), "edge/384x5504": (384, 5504), "edge/5504x384": (5504, 384),
    "edge/128x33792": (128, 33792), "edge/33792x128": (33792, 128),
    "edge/1024x33792": (1024, 33792), "edge/33792x1024": (33792, 1024),
    "edge/12288x33792": (12288, 33792), "edge/33792x12288": (33792, 12288),
}
MOE = _merge(
    moe_shapes("qwen3-30b-a3b"), moe_shapes("qwen3-30b-a3b", tp=2),  # I = 384: % 256 == 128
    moe_shapes("deepseek-v3", ep=8), moe_shapes("deepseek-v3", tp=8),
    moe_shapes("deepseek-v3"),
)
