"""Expert tensors read straight from safetensors files (``expert_blocks.py``,
the load format ``w4a8_fastprep``): a layer filled from the file's bytes
holds byte for byte what vLLM's expert weight loader gives it, whatever the
file's order (experts at a constant stride, or not), piece size and read
split; layers the blocks cannot give exactly what vLLM's loader would are
left to it, saying why; bad files are one error naming the file."""

import random
import time

import pytest
import torch
from must_run import import_or_skip

import_or_skip("vllm")

from block_threads import block_threads  # noqa: E402
from moe_layers import fused_moe, per_expert, prepare_only_config  # noqa: E402
from safetensors_files import ST_DTYPES, write_safetensors  # noqa: E402

from vllm_w4a8_fastprep import expert_blocks, expert_staging  # noqa: E402
from vllm_w4a8_fastprep.compat import w13_num_shards  # noqa: E402
from vllm_w4a8_fastprep.load_checks import LoadError  # noqa: E402

def _layer(qc, prefix, device, experts=8, hidden=256, inter=256):
    return fused_moe(qc, prefix, experts, hidden, inter, device)


def _reference(prefix, tensors, device, monkeypatch, **shape):
    """The layer as vLLM's expert weight loader fills it (staging off),
    named ``ref.<prefix>`` (vLLM's layer names are unique)."""
    with monkeypatch.context() as m:
        m.setenv(expert_staging.ENV, "0")
        runner = _layer(prepare_only_config(), f"ref.{prefix}", device, **shape)
        list(runner.load_weights(list(tensors.items())))
    return runner


def _blocks(prefix, path, device, piece_bytes=expert_blocks.PIECE_BYTES, **shape):
    """The layer filled by the blocks from ``path``; (runner, stats)."""
    runner = _layer(prepare_only_config(), prefix, device, **shape)
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
    tensors = per_expert({}, 8, 256, 256)
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
    tensors = per_expert({}, 8, 256, 256)
    entries = {n: expert_blocks.Entry(n, "f", ST_DTYPES[t.dtype], tuple(t.shape), 0, 0)
               for n, t in _named(prefix, tensors)}
    runner = _layer(prepare_only_config(), prefix, vllm_ctx)
    layer = runner.routed_experts
    m = layer.quant_method
    plan, why = expert_blocks.plan_layer(layer, m, entries, 2)
    assert plan is not None and why is None and len(plan.copies) == len(tensors)
    for damage, said in (
            (lambda e: e.pop(f"{prefix}.5.up_proj.weight_scale"),
             f"{prefix}.5.up_proj.weight_scale is not in the checkpoint's headers"),
            (lambda e: e.__setitem__(f"{prefix}.2.down_proj.weight_packed",
                                     expert_blocks.Entry("x", "f", "I32", (256, 16), 0, 0)),
             f"{prefix}.2.down_proj.weight_packed is I32 [256, 16]"),
            (lambda e: e.__setitem__(f"{prefix}.0.gate_proj.weight_packed",
                                     expert_blocks.Entry("x", "f", "F32", (256, 32), 0, 0)),
             f"{prefix}.0.gate_proj.weight_packed is F32 [256, 32]")):
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
    write_safetensors(path, _named(prefix, per_expert({}, 8, 256, 256)))
    runner = _layer(prepare_only_config(), prefix, vllm_ctx)
    layer = runner.routed_experts
    plan, _ = expert_blocks.plan_layer(layer, layer.quant_method,
                                       expert_blocks.read_header(str(path)), 2)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    with pytest.raises(LoadError, match=rf"^{path}: ended at byte \d+, its header says \d+ "
                                        r"\(a truncated checkpoint file\)"):
        expert_blocks.load([plan])


def _sorted_file(prefix, path, tensors):
    items = _named(prefix, tensors)
    items.sort(key=lambda kv: (str(kv[1].dtype), kv[0]))  # safetensors' own order
    write_safetensors(path, items)


def test_the_next_piece_is_read_while_one_is_put_in_place(vllm_ctx, monkeypatch, tmp_path):
    """Piece n + 1's read starts before piece n is checked, sent and put in
    place (two buffers taking turns), and the layer ends as vLLM's loader
    fills it."""
    prefix = "blocks.ahead.experts"
    tensors = per_expert({}, 8, 256, 256)
    _sorted_file(prefix, tmp_path / "a.safetensors", tensors)
    ref = _reference(prefix, tensors, vllm_ctx, monkeypatch)
    seen = []
    submit, scatter = expert_blocks._Reader.submit, expert_blocks._scatter

    def reading(self, path, start, into):
        seen.append(("read", start))
        return submit(self, path, start, into)

    def placing(plans, piece, buf, base, slot):
        seen.append(("place", base))
        return scatter(plans, piece, buf, base, slot)

    monkeypatch.setattr(expert_blocks._Reader, "submit", reading)
    monkeypatch.setattr(expert_blocks, "_scatter", placing)
    got, stats = _blocks(prefix, tmp_path / "a.safetensors", vllm_ctx, 64 << 10)
    starts = [s for what, s in seen if what == "read"]
    assert stats.pieces == len(starts) >= 4
    want = [("read", starts[0])]
    for n, s in enumerate(starts):
        want += [("read", starts[n + 1])] if n + 1 < len(starts) else []
        want.append(("place", s))
    assert seen == want
    _assert_same_params(ref, got)
    assert not block_threads()


def test_an_error_while_the_next_piece_is_read_waits_for_that_read(vllm_ctx, monkeypatch,
                                                                   tmp_path):
    """Whatever ends the load while the next piece is being read (here an
    error putting the first piece in place, injected): the load ends with
    that error only once the read under way has ended (its buffer is freed
    after it), and leaves no reader thread."""
    prefix = "blocks.inflight.experts"
    _sorted_file(prefix, tmp_path / "e.safetensors", per_expert({}, 8, 256, 256))
    pread, started, ended = expert_blocks._pread_all, [], []

    def slow_read(fd, into, offset, path):
        started.append(offset)
        time.sleep(0.3)
        pread(fd, into, offset, path)
        ended.append(offset)

    def failing(plans, piece, buf, base, slot):
        deadline = time.monotonic() + 30
        while len(started) < 2 and time.monotonic() < deadline:  # piece 1's read under way
            time.sleep(0.01)
        raise LoadError("injected")

    monkeypatch.setattr(expert_blocks, "_pread_all", slow_read)
    monkeypatch.setattr(expert_blocks, "_scatter", failing)
    runner = _layer(prepare_only_config(), prefix, vllm_ctx)
    layer = runner.routed_experts
    plan, why = expert_blocks.plan_layer(
        layer, layer.quant_method, expert_blocks.read_header(str(tmp_path / "e.safetensors")), 2)
    assert plan is not None, why
    with pytest.raises(LoadError, match="^injected$"):
        expert_blocks.load([plan], 64 << 10)
    assert len(started) == 2 and sorted(ended) == sorted(started)  # pieces 0 and 1
    assert not block_threads()


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_paused_and_left_as_it_was(enabled):
    import gc

    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        with pytest.raises(KeyError):
            with expert_blocks.gc_paused():
                assert not gc.isenabled()
                raise KeyError("a load that stops")
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.parametrize("content, said", [
    (b"\x01\x02", "truncated, or not a safetensors file (shorter than 8 bytes: 2)"),
    ((2).to_bytes(8, "little") + b"[]", "corrupt safetensors header (a JSON list, not an object)"),
])
def test_a_bad_header_is_one_error_naming_the_file(tmp_path, content, said):
    """safetensors_header's word on it (tests/plugin/test_safetensors_header.py has
    every case), after the file's path."""
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(LoadError) as e:
        expert_blocks.read_header(str(path))
    assert str(e.value) == f"{path}: {said}"


def test_bad_weight_shape_values_are_refused_as_vllms_loader_refuses_them(
        vllm_ctx, monkeypatch, tmp_path):
    """A ``weight_shape`` saying another size: recorded by the method's own
    check, one error at preparation naming layer, expert and values."""
    prefix = "blocks.shape.experts"
    tensors = per_expert({}, 8, 256, 256)
    tensors["3.up_proj.weight_shape"] = torch.tensor([128, 256], dtype=torch.int64)
    write_safetensors(tmp_path / "s.safetensors", _named(prefix, tensors))
    got, _ = _blocks(prefix, tmp_path / "s.safetensors", vllm_ctx)
    with pytest.raises(LoadError, match=r"up_proj\.weight_shape is \[128, 256\]") as e:
        got.routed_experts.quant_method.process_weights_after_loading(got.routed_experts)
    assert prefix in str(e.value) and "expert 3" in str(e.value), str(e.value)


def test_safetensors_own_files_over_two_shards_with_other_scale_dtypes(
        vllm_ctx, monkeypatch, tmp_path):
    """12 experts (safetensors orders names 0, 1, 10, 11, 2, ...) written by
    safetensors itself over two files, fp32 scales and int32 shapes in part:
    converted as vLLM's loader converts them."""
    from safetensors.torch import save_file

    prefix = "blocks.st12.experts"
    tensors = per_expert({}, 12, 256, 256)
    for k in list(tensors):
        if k.endswith("up_proj.weight_scale"):
            tensors[k] = tensors[k].float()
        if k.endswith("down_proj.weight_shape"):
            tensors[k] = tensors[k].to(torch.int32)
    named = dict(_named(prefix, tensors))
    first = {n: t for n, t in named.items() if "gate" in n or int(n.split(".")[3]) % 2}
    save_file(first, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({n: t for n, t in named.items() if n not in first},
              str(tmp_path / "model-00002-of-00002.safetensors"))
    ref = _reference(prefix, tensors, vllm_ctx, monkeypatch, experts=12)
    runner = _layer(prepare_only_config(), prefix, vllm_ctx, experts=12)
    layer = runner.routed_experts
    entries = {}
    for path in sorted(tmp_path.glob("*.safetensors")):
        entries.update(expert_blocks.read_header(str(path)))
    plan, why = expert_blocks.plan_layer(layer, layer.quant_method, entries, 2)
    assert plan is not None, why
    stats = expert_blocks.load([plan], 64 << 10)
    assert stats.tensors == len(tensors) and stats.pieces > 2
    _assert_same_params(ref, runner)


def test_checkpoint_names_the_model_renames_are_matched_under_its_names(vllm_ctx, monkeypatch,
                                                                        tmp_path):
    """A model whose load_weights renames the checkpoint's tensors
    (``hf_to_vllm_mapper``): the layer is matched under the renamed names,
    and what was read is named as stored."""
    from vllm.model_executor.models.utils import WeightsMapper

    prefix = "blocks.mapped.experts"
    tensors = per_expert({}, 8, 256, 256)
    stored = [(f"ckpt.mapped.experts.{k}", v) for k, v in tensors.items()]
    write_safetensors(tmp_path / "m.safetensors", stored)
    entries = expert_blocks.rename(expert_blocks.read_header(str(tmp_path / "m.safetensors")),
                                   WeightsMapper(orig_to_new_prefix={"ckpt.": "blocks."}))
    ref = _reference(prefix, tensors, vllm_ctx, monkeypatch)
    runner = _layer(prepare_only_config(), prefix, vllm_ctx)
    layer = runner.routed_experts
    plan, why = expert_blocks.plan_layer(layer, layer.quant_method, entries, 2)
    assert plan is not None, why
    stats = expert_blocks.load([plan])
    assert stats.names == {n for n, _ in stored}
    _assert_same_params(ref, runner)
    dropped = expert_blocks.rename(entries, WeightsMapper(orig_to_new_prefix={"blocks.": None}))
    assert dropped == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU and the CPU")
def test_layers_on_the_gpu_and_offloaded_to_the_cpu_load_alike(vllm_ctx, monkeypatch, tmp_path):
    """Pieces go to one device each (vLLM's offloaders put parameters on the
    CPU before loading); a layer with parameters on two devices is left to
    vLLM's loader."""
    tensors = per_expert({}, 8, 256, 256)
    items = []
    for p in ("blocks.dev0.experts", "blocks.dev1.experts"):
        items += _named(p, tensors)
    items.sort(key=lambda kv: (str(kv[1].dtype), kv[0]))  # the two layers in one piece
    write_safetensors(tmp_path / "m.safetensors", items)
    entries = expert_blocks.read_header(str(tmp_path / "m.safetensors"))
    ref = _reference("blocks.dev0.experts", tensors, vllm_ctx, monkeypatch)
    on_gpu = _layer(prepare_only_config(), "blocks.dev0.experts", vllm_ctx)
    on_cpu = _layer(prepare_only_config(), "blocks.dev1.experts", vllm_ctx).to("cpu")
    plans = []
    for runner in (on_gpu, on_cpu):
        layer = runner.routed_experts
        plan, why = expert_blocks.plan_layer(layer, layer.quant_method, entries, 2)
        assert plan is not None, why
        plans.append(plan)
    buffer, sent_from = expert_blocks._buffer, []

    def watched(slot, key, size, device, pin=False):
        out = buffer(slot, key, size, device, pin)
        if pin:  # a host buffer a GPU piece is sent from
            sent_from.append(out.is_pinned())
        return out

    monkeypatch.setattr(expert_blocks, "_buffer", watched)
    expert_blocks.load(plans, 64 << 10)  # the CPU layer's pieces first, then the GPU's
    assert sent_from and all(sent_from)  # pinned, not the CPU pieces' pageable buffers
    _assert_same_params(ref, on_gpu)
    _assert_same_params(ref.to("cpu"), on_cpu)
    half = _layer(prepare_only_config(), "blocks.dev2.experts", vllm_ctx)
    half.routed_experts.w2_weight_scale.data = half.routed_experts.w2_weight_scale.data.cpu()
    plan, why = expert_blocks.plan_layer(half.routed_experts, half.routed_experts.quant_method,
                                         entries, 2)
    assert plan is None and why == "its parameters are on several devices (offloaded in part)"
