"""Helpers of the MoE tests (tests/plugin/): vLLM's FusedMoE layers built with
this package's config (its preparation-only mode where no SM90 GPU is present),
random per-expert checkpoint tensors, loading through vLLM's own expert weight
loader, the dense reference of a prepared layer and its check, and models that
vLLM's layer-wise reload can reload."""

import json

import torch
from bitexact import (
    assert_channel_scales_equal,
    assert_packed_scales_equal,
    assert_same,
    assert_weight_equal,
)

from vllm_w4a8_fastprep import moe
from vllm_w4a8_fastprep import reference as ref
from vllm_w4a8_fastprep.compat import moe_weight_names
from vllm_w4a8_fastprep.tools.synthetic import PRESETS, quantization_config, random_w4afp8_experts

TINY = PRESETS["tiny-moe"]  # 8 experts, hidden 256, moe intermediate 256


def prepare_only_config(cfg: dict | None = None):
    """Our config, with MoE layers taking the method's preparation-only mode
    (the config proper hands them to upstream where no SM90 GPU is present)."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    from vllm_w4a8_fastprep.config import W4A8FastPrepConfig

    class PrepareOnlyConfig(W4A8FastPrepConfig):
        def get_quant_method(self, layer, prefix):
            if isinstance(layer, RoutedExperts):
                return moe.make_moe_method(self, layer, prefix, kernel=False)
            return super().get_quant_method(layer, prefix)

    return PrepareOnlyConfig.from_config(cfg or quantization_config(moe=True))


def fused_moe(qc, prefix: str, experts: int, hidden: int, intermediate: int, device):
    from vllm_w4a8_fastprep.compat import make_fused_moe

    runner = make_fused_moe(num_experts=experts, top_k=2, hidden_size=hidden,
                            intermediate_size=intermediate, params_dtype=torch.bfloat16,
                            quant_config=qc, prefix=prefix)
    return runner.to(device)


def checkpoint_experts(ckpt, layer: int) -> dict[str, torch.Tensor]:
    """``{"E.proj.tensor": t}`` of one layer's experts, as stored."""
    from safetensors import safe_open

    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    prefix = f"model.layers.{layer}.mlp.experts."
    out = {}
    for fname in sorted(set(weight_map.values())):
        with safe_open(str(ckpt / fname), "pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    out[key[len(prefix):]] = f.get_tensor(key)
    return out


def router(ckpt, layer: int) -> torch.Tensor:
    from safetensors import safe_open

    name = f"model.layers.{layer}.mlp.gate.weight"
    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(ckpt / weight_map[name]), "pt") as f:
        return f.get_tensor(name)


def per_expert(tensors: dict, experts: int, hidden: int, intermediate: int) -> dict:
    """Random per-expert checkpoint tensors named as stored: ``E.proj.tensor``."""
    g = torch.Generator().manual_seed(experts * 1000 + intermediate)
    out = {}
    for proj, (n, k) in (("gate_proj", (intermediate, hidden)), ("up_proj", (intermediate, hidden)),
                         ("down_proj", (hidden, intermediate))):
        stacked = random_w4afp8_experts(experts, n, k, g)
        for e in range(experts):
            for t, v in stacked.items():
                out[f"{e}.{proj}.{t}"] = v[e].clone()
    tensors.update(out)
    return out


def load_through_vllm(runner, tensors: dict) -> set[str]:
    """Through vLLM's own expert weight loader (MoERunner -> RoutedExperts);
    the names of the RoutedExperts parameters it filled (vLLM >= 0.31 reports
    them as ``routed_experts.<name>``)."""
    return {name.removeprefix("routed_experts.")
            for name in runner.load_weights(list(tensors.items()))}


def expected_prepared(tensors: dict, experts: list[int], path: str = "native",
              i_slice: slice | None = None) -> dict:
    """The dense reference applied to each expert alone, stacked as vLLM's
    MoE GEMM takes them. ``i_slice``: this rank's part of the intermediate
    size (tensor parallelism)."""
    w13, s13, w2, s2 = [], [], [], []
    for e in experts:
        gate_w, gate_s = (tensors[f"{e}.gate_proj.weight_{t}"] for t in ("packed", "scale"))
        up_w, up_s = (tensors[f"{e}.up_proj.weight_{t}"] for t in ("packed", "scale"))
        down_w, down_s = (tensors[f"{e}.down_proj.weight_{t}"] for t in ("packed", "scale"))
        if i_slice is not None:  # N of gate/up, K of down (8 per int32, 128 per scale)
            gate_w, up_w = gate_w[i_slice], up_w[i_slice]
            gate_s, up_s = gate_s[i_slice], up_s[i_slice]
            a, b = i_slice.start, i_slice.stop
            down_w, down_s = down_w[:, a // 8:b // 8], down_s[:, a // 128:b // 128]
        w13.append(ref.prepare_weight(torch.cat([gate_w, up_w])).t())  # memory: [N, K/8]
        w2.append(ref.prepare_weight(down_w.contiguous()).t())
        s13.append(ref.prepare_scales(torch.cat([gate_s, up_s]), path))
        s2.append(ref.prepare_scales(down_s.contiguous(), path))
    return {
        "w13_weight_packed": torch.stack(w13),
        "w2_weight_packed": torch.stack(w2),
        "w13_weight_scale": torch.cat([p for p, _ in s13]),
        "w2_weight_scale": torch.cat([p for p, _ in s2]),
        "w13_weight_chan_scale": torch.stack([c for _, c in s13]),
        "w2_weight_chan_scale": torch.stack([c for _, c in s2]),
    }


def check_prepared(layer, want: dict, hidden: int, intermediate: int,
                    config_on_layer: bool = True) -> None:
    """``layer``: a prepared RoutedExperts; ``want``: from ``expected_prepared``.
    ``config_on_layer``: the quant config holds the layer's own tensors
    (else equal ones: a layer-wise reload that built the config anew on the
    outputs before vLLM copied them back into the first load's tensors)."""
    w13, w2 = (getattr(layer, name) for name in moe_weight_names())
    assert_weight_equal(w13.data, want["w13_weight_packed"], "w13 weights")
    assert_weight_equal(w2.data, want["w2_weight_packed"], "w2 weights")
    assert_packed_scales_equal(layer.w13_weight_scale.data, want["w13_weight_scale"],
                               n=2 * intermediate, k=hidden, what="w13 group scales")
    assert_packed_scales_equal(layer.w2_weight_scale.data, want["w2_weight_scale"],
                               n=hidden, k=intermediate, what="w2 group scales")
    assert_channel_scales_equal(layer.w13_weight_chan_scale.data, want["w13_weight_chan_scale"],
                                "w13 channel scales")
    assert_channel_scales_equal(layer.w2_weight_chan_scale.data, want["w2_weight_chan_scale"],
                                "w2 channel scales")
    experts = want["w13_weight_packed"].shape[0]
    method = layer.quant_method
    # every row of CUTLASS's reordered-B layout: (N/16, K/32, 32*N)
    for strides, n, k in ((method.b_strides1, 2 * intermediate, hidden),
                          (method.b_strides2, hidden, intermediate)):
        want_rows = torch.tensor([[n // 16, k // 32, 32 * n]] * experts, dtype=strides.dtype)
        assert_same(strides.cpu(), want_rows, "b_strides")
    # the GEMM's quant config reads the prepared tensors
    qc = method.moe_quant_config
    assert qc is not None
    pairs = ((qc.w1_scale, layer.w13_weight_scale), (qc.w2_scale, layer.w2_weight_scale),
             (qc.g1_alphas, layer.w13_weight_chan_scale),
             (qc.g2_alphas, layer.w2_weight_chan_scale))
    for used, held in pairs:
        if config_on_layer:
            assert used is held
        else:
            assert_same(used.data, held.data, "the quant config's tensors")



def force_cpu_staging(capacity: int, patch=None) -> list:
    """Make the MoE method stage CPU parameters as it stages GPU ones (its
    own ``_stager``, with CPU stagers of ``capacity`` bytes); returns the
    list of stagers made. ``patch``: pytest's ``monkeypatch.setattr`` (a
    spawned rank has none: module attributes are set for good)."""
    import builtins

    from vllm_w4a8_fastprep.expert_staging import ExpertStager

    made = []

    class Recorded(ExpertStager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    put = patch or builtins.setattr
    put(moe, "ExpertStager", Recorded)
    put(moe, "STAGED_DEVICE_TYPES", ("cuda", "cpu"))
    put(moe, "staging_capacity", lambda: capacity)
    return made



def reloadable_model(qc, device, name="m0", experts=4, hidden=256, inter=256, dense=True):
    """A MoE layer and (``dense``) a dense layer in one module, built as vLLM
    builds a model (on the load device, its reload metadata recorded right
    after construction)."""
    from vllm.model_executor.layers.linear import ColumnParallelLinear
    from vllm.model_executor.model_loader.reload import record_metadata_for_reloading

    with torch.device(device):  # as vLLM's loader: the reload materialises layers there
        model = torch.nn.Module()
        model.moe = fused_moe(qc, f"{name}.layers.0.mlp.experts", experts, hidden, inter,
                               device)
        if dense:
            model.dense = ColumnParallelLinear(hidden, 384, bias=False, quant_config=qc,
                                               prefix=f"{name}.layers.0.mlp.up",
                                               params_dtype=torch.bfloat16).to(device)
        record_metadata_for_reloading(model)
    return model


def load_model(model, experts: dict, dense: dict) -> None:
    load_through_vllm(model.moe, experts)
    for name, t in dense.items():
        param = getattr(model.dense, name)
        param.weight_loader(param, t)


def process_model(model) -> None:
    for m in model.modules():
        method = getattr(m, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(m)


def prepared_params(model) -> dict:
    """Every parameter of the model, copied (bytes compared by the caller)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def reload_model(model, experts: dict, dense: dict | None = None) -> None:
    from vllm.model_executor.model_loader.reload import (
        finalize_layerwise_reload,
        initialize_layerwise_reload,
    )

    initialize_layerwise_reload(model)
    load_model(model, experts, dense or {})
    finalize_layerwise_reload(model, None)


def other_weights(experts: int, hidden: int, inter: int) -> dict:
    """Expert tensors of the same shapes as ``per_expert``'s, other values
    (weights and group scales)."""
    out = per_expert({}, experts, hidden, inter)
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    for name, t in out.items():
        if name.endswith("weight_packed"):
            t.random_(-(2**31), 2**31 - 1, generator=g)
        elif name.endswith("weight_scale"):
            t.mul_((torch.rand(t.shape, generator=g) + 0.5).to(t.dtype))
    return out
