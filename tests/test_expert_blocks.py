"""Expert tensors read straight from safetensors files (``expert_blocks.py``,
the load format ``w4a8_fastprep``): a layer filled from the file's bytes
holds byte for byte what vLLM's expert weight loader gives it, whatever the
file's order (experts at a constant stride, or not), piece size and read
split; layers the blocks cannot give exactly what vLLM's loader would are
left to it, saying why; bad files are one error naming the file."""

import json
import random

import pytest
import torch
from must_run import import_or_skip

import_or_skip("vllm")

from test_moe import _fused_moe, _per_expert, _prepare_only_config  # noqa: E402

from vllm_w4a8_fastprep import expert_blocks, expert_staging  # noqa: E402
from vllm_w4a8_fastprep.compat import w13_num_shards  # noqa: E402
from vllm_w4a8_fastprep.load_checks import LoadError  # noqa: E402

_ST_DTYPES = {torch.int32: "I32", torch.int64: "I64", torch.bfloat16: "BF16",
              torch.float16: "F16", torch.float32: "F32", torch.uint8: "U8"}


def write_safetensors(path, items: list[tuple[str, torch.Tensor]]) -> None:
    """A safetensors file holding ``items`` in this order (safetensors'
    own writer sorts them; here the order is the test's)."""
    header, blobs, at = {}, [], 0
    for name, t in items:
        raw = t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() \
            if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for b in blobs:
            f.write(b)


def _layer(qc, prefix, device, experts=8, hidden=256, inter=256):
    return _fused_moe(qc, prefix, experts, hidden, inter, device)


def _reference(prefix, tensors, device, monkeypatch, **shape):
    """The layer as vLLM's expert weight loader fills it (staging off),
    named ``ref.<prefix>`` (vLLM's layer names are unique)."""
    with monkeypatch.context() as m:
        m.setenv(expert_staging.ENV, "0")
        runner = _layer(_prepare_only_config(), f"ref.{prefix}", device, **shape)
        list(runner.load_weights(list(tensors.items())))
    return runner


def _blocks(prefix, path, device, piece_bytes=expert_blocks.PIECE_BYTES, **shape):
    """The layer filled by the blocks from ``path``; (runner, stats)."""
    runner = _layer(_prepare_only_config(), prefix, device, **shape)
    layer = runner.routed_experts
    method = layer.quant_method
    plan, why = expert_blocks.plan_layer(layer, method, expert_blocks.read_header(str(path)),
                                         w13_num_shards(method.moe))
    assert plan is not None, why
    return runner, expert_blocks.load([plan], piece_bytes)


def _assert_same_params(a, b):
    pa, pb = dict(a.routed_experts.named_parameters()), dict(b.routed_experts.named_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        x, y = pa[n].data.view(torch.uint8), pb[n].data.view(torch.uint8)
        diff = (x != y).nonzero()
        assert diff.numel() == 0, f"{n}: first difference at {diff[0].tolist()}"


def _named(prefix, tensors):
    return [(f"{prefix}.{k}", v) for k, v in tensors.items()]


@pytest.mark.parametrize("order, piece", [("sorted", expert_blocks.PIECE_BYTES),
                                          ("sorted", 100 << 10), ("by-expert", 256 << 10),
                                          ("shuffled", 64 << 10)])
def test_blocks_fill_a_layer_as_vllms_loader_does(vllm_ctx, monkeypatch, tmp_path, order, piece):
    """sorted: each kind's experts at a constant stride (llm-compressor's
    files), one strided copy per parameter, shard and piece; by-expert: a
    constant stride over the kinds; shuffled: one copy per tensor. Small
    pieces: many pieces through the two buffers."""
    prefix = f"blocks.{order}{piece}.experts"
    tensors = _per_expert({}, 8, 256, 256)
    items = _named(prefix, tensors)
    if order == "sorted":  # safetensors' own order: by dtype, then name
        items.sort(key=lambda kv: (str(kv[1].dtype), kv[0]))
    elif order == "by-expert":
        items.sort(key=lambda kv: int(kv[0].split(".")[3]))
    else:
        random.Random(piece).shuffle(items)
    other = [("model.norm.weight", torch.randn(256, dtype=torch.bfloat16)),
             ("model.gap", torch.randint(0, 9, (3333,), dtype=torch.uint8))]
    write_safetensors(tmp_path / "m.safetensors", other[:1] + items[:13] + other[1:] + items[13:])
    ref = _reference(prefix, tensors, vllm_ctx, monkeypatch)
    got, stats = _blocks(prefix, tmp_path / "m.safetensors", vllm_ctx, piece)
    _assert_same_params(ref, got)
    assert stats.tensors == len(tensors) and stats.layers == 1
    assert stats.names == {n for n, _ in items}
    assert (stats.pieces == 1) == (piece == expert_blocks.PIECE_BYTES)
    mr, mg = ref.routed_experts.quant_method, got.routed_experts.quant_method
    assert mr._loaded == mg._loaded
    # prepared alike: the method takes the blocks' load as loaded
    mr.process_weights_after_loading(ref.routed_experts)
    mg.process_weights_after_loading(got.routed_experts)
    _assert_same_params(ref, got)


def test_a_layer_the_blocks_cannot_give_exactly_is_left_to_vllm_saying_why(vllm_ctx, tmp_path):
    prefix = "blocks.left.experts"
    tensors = _per_expert({}, 8, 256, 256)
    entries = {n: expert_blocks.Entry("f", t.dtype, tuple(t.shape), 0, 0)
               for n, t in _named(prefix, tensors)}
    runner = _layer(_prepare_only_config(), prefix, vllm_ctx)
    layer = runner.routed_experts
    m = layer.quant_method
    plan, why = expert_blocks.plan_layer(layer, m, entries, 2)
    assert plan is not None and why is None and len(plan.copies) == len(tensors)
    for damage, said in (
            (lambda e: e.pop(f"{prefix}.5.up_proj.weight_scale"),
             f"{prefix}.5.up_proj.weight_scale is not in the checkpoint's headers"),
            (lambda e: e.__setitem__(f"{prefix}.2.down_proj.weight_packed",
                                     expert_blocks.Entry("f", torch.int32, (256, 16), 0, 0)),
             f"{prefix}.2.down_proj.weight_packed is torch.int32 [256, 16]"),
            (lambda e: e.__setitem__(f"{prefix}.0.gate_proj.weight_packed",
                                     expert_blocks.Entry("f", torch.float32, (256, 32), 0, 0)),
             f"{prefix}.0.gate_proj.weight_packed is torch.float32 [256, 32]")):
        bad = dict(entries)
        damage(bad)
        plan, why = expert_blocks.plan_layer(layer, m, bad, 2)
        assert plan is None and why == said
    m._prepared = {"w13_weight_packed": layer.w13_weight_packed}  # as after a first load
    plan, why = expert_blocks.plan_layer(layer, m, entries, 2)
    assert plan is None and "reload" in why


def test_a_truncated_file_is_one_error_naming_it(vllm_ctx, tmp_path):
    prefix = "blocks.cut.experts"
    path = tmp_path / "cut.safetensors"
    write_safetensors(path, _named(prefix, _per_expert({}, 8, 256, 256)))
    runner = _layer(_prepare_only_config(), prefix, vllm_ctx)
    layer = runner.routed_experts
    plan, _ = expert_blocks.plan_layer(layer, layer.quant_method,
                                       expert_blocks.read_header(str(path)), 2)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    with pytest.raises(LoadError, match=rf"^{path}: ended at byte \d+, its header says \d+ "
                                        r"\(a truncated checkpoint file\)"):
        expert_blocks.load([plan])


@pytest.mark.parametrize("content, said", [
    (b"", "not a safetensors file (header length -1)"),
    ((1 << 40).to_bytes(8, "little"), f"not a safetensors file (header length {1 << 40})"),
    ((5).to_bytes(8, "little") + b"{nope", "cannot read its safetensors header"),
    ((2).to_bytes(8, "little") + b"[]", "cannot read its safetensors header"),
])
def test_a_bad_header_is_one_error_naming_the_file(tmp_path, content, said):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(LoadError, match=f"^{path}: ") as e:
        expert_blocks.read_header(str(path))
    assert said in str(e.value)


def test_bad_weight_shape_values_are_refused_as_vllms_loader_refuses_them(
        vllm_ctx, monkeypatch, tmp_path):
    """A ``weight_shape`` saying another size: recorded by the method's own
    check, one error at preparation naming layer, expert and values."""
    prefix = "blocks.shape.experts"
    tensors = _per_expert({}, 8, 256, 256)
    tensors["3.up_proj.weight_shape"] = torch.tensor([128, 256], dtype=torch.int64)
    write_safetensors(tmp_path / "s.safetensors", _named(prefix, tensors))
    got, _ = _blocks(prefix, tmp_path / "s.safetensors", vllm_ctx)
    with pytest.raises(LoadError, match=r"up_proj\.weight_shape is \[128, 256\]") as e:
        got.routed_experts.quant_method.process_weights_after_loading(got.routed_experts)
    assert prefix in str(e.value) and "3" in str(e.value)
