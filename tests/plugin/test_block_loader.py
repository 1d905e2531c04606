"""The load format ``w4a8_fastprep`` (``block_loader.py``) on a model of
vLLM's own Qwen3-MoE blocks and the tiny synthetic MoE checkpoint: the
model's ``load_weights`` is given exactly what vLLM's default loader gives it
less the expert tensors read from the files, and every parameter ends byte
for byte as with the default loader; layers it cannot take (a reload,
tensors missing from the headers) load through vLLM's loader, logged."""

import re

import pytest
import torch
from must_run import import_or_skip

import_or_skip("vllm")

from block_threads import block_threads  # noqa: E402
from moe_layers import TINY, prepare_only_config  # noqa: E402

from vllm_w4a8_fastprep import expert_blocks, expert_staging  # noqa: E402
from vllm_w4a8_fastprep.tools.synthetic import write_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny-moe-blocks"), "tiny-moe")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The same model over many files (an expert layer split between files)."""
    ckpt = write_checkpoint(tmp_path_factory.mktemp("tiny-moe-sharded"), "tiny-moe",
                            shard_bytes=96 << 10)
    assert len(list(ckpt.glob("*.safetensors"))) >= 10
    return ckpt


class _Blocks(torch.nn.Module):
    """vLLM's Qwen3-MoE blocks of every layer of the checkpoint (router and
    experts; our MoE method in its preparation-only mode), named as the
    model names them; ``load_weights`` as the model's: each block's tensors
    to vLLM's AutoWeightsLoader, every name seen kept."""

    def __init__(self, ckpt, device):
        super().__init__()
        from vllm.config import DeviceConfig, ModelConfig, VllmConfig, set_current_vllm_config
        from vllm.model_executor.models.qwen3_moe import Qwen3MoeSparseMoeBlock
        from vllm.utils.torch_utils import set_default_torch_dtype

        self.model_config = ModelConfig(model=str(ckpt), tokenizer=str(ckpt),
                                        quantization="w4a8_fastprep")
        vc = VllmConfig(model_config=self.model_config, quant_config=prepare_only_config(),
                        device_config=DeviceConfig(device=device.type))
        with set_current_vllm_config(vc), set_default_torch_dtype(self.model_config.dtype):
            self.blocks = torch.nn.ModuleList(
                Qwen3MoeSparseMoeBlock(vllm_config=vc, prefix=f"model.layers.{i}.mlp")
                for i in range(TINY.layers)).to(device)
        self.seen: list[str] = []

    def experts(self):
        return [b.experts.routed_experts for b in self.blocks]

    def load_weights(self, weights):
        from vllm.model_executor.models.utils import AutoWeightsLoader

        per_block: dict[int, list] = {}
        for name, t in weights:
            self.seen.append(name)
            parts = name.split(".")
            if len(parts) > 4 and parts[1] == "layers" and parts[3] == "mlp":  # layers.I.mlp
                per_block.setdefault(int(parts[2]), []).append((".".join(parts[4:]), t))
        for i, items in per_block.items():
            list(AutoWeightsLoader(self.blocks[i]).load_weights(items))
        return None


def _loader(fmt: str, **load_config):
    from vllm.config import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader

    import vllm_w4a8_fastprep

    vllm_w4a8_fastprep.register()
    return get_model_loader(LoadConfig(load_format=fmt, **load_config))


def _load(model, fmt: str, local_expert_ids=None, **load_config):
    loader = _loader(fmt, **load_config)
    loader.local_expert_ids = local_expert_ids  # vLLM's expert-parallel filter
    model.load_weights(loader.get_all_weights(model.model_config, model))
    return loader


def _assert_same(a, b):
    for la, lb in zip(a.experts(), b.experts()):
        pa, pb = dict(la.named_parameters()), dict(lb.named_parameters())
        assert pa.keys() == pb.keys()
        for n in pa:
            x, y = pa[n].data.view(torch.uint8), pb[n].data.view(torch.uint8)
            diff = (x != y).nonzero()
            assert diff.numel() == 0, f"{n}: first difference at {diff[0].tolist()}"
    for ba, bb in zip(a.blocks, b.blocks):
        assert torch.equal(ba.gate.weight, bb.gate.weight)


@pytest.mark.parametrize("strategy", [None, "eager"])
def test_the_load_format_gives_the_model_the_rest_and_fills_experts_as_vllm(
        vllm_ctx, tiny_moe, monkeypatch, log_lines, strategy):
    """None: vLLM's default (lazy) reads, the rest read here without opening
    the expert tensors; eager: vLLM's own iterator, the expert names dropped."""
    monkeypatch.setenv(expert_staging.ENV, "0")
    ref = _Blocks(tiny_moe, vllm_ctx)
    _load(ref, "auto", safetensors_load_strategy=strategy)
    ours = _Blocks(tiny_moe, vllm_ctx)
    loader = _load(ours, "w4a8_fastprep", safetensors_load_strategy=strategy)
    stats = loader.last_load
    experts = TINY.layers * TINY.experts * 3 * 3  # layers x experts x proj x kinds
    assert stats.layers == TINY.layers and stats.tensors == experts
    rest = [n for n in ref.seen if n not in stats.names]
    if strategy == "eager":  # safetensors' load() orders a file's tensors anew each call
        ours.seen, rest = sorted(ours.seen), sorted(rest)
    assert ours.seen == rest
    assert len(ref.seen) - len(ours.seen) == experts
    _assert_same(ref, ours)
    for a, b in zip(ref.experts(), ours.experts()):
        assert a.quant_method._loaded == b.quant_method._loaded
        a.quant_method.process_weights_after_loading(a)
        b.quant_method.process_weights_after_loading(b)
    _assert_same(ref, ours)
    said = [r.getMessage() for r in log_lines if "load format" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(
        f"w4a8_fastprep: load format w4a8_fastprep: {experts} MoE expert tensors of "
        f"{TINY.layers} layers"), said


def test_a_layer_not_taken_loads_through_vllms_loader_and_is_named(
        vllm_ctx, tiny_moe, monkeypatch, log_lines):
    monkeypatch.setenv(expert_staging.ENV, "0")
    ref = _Blocks(tiny_moe, vllm_ctx)
    _load(ref, "auto")
    plan_layer = expert_blocks.plan_layer

    def refuse_layer_1(layer, method, entries, halves):
        if method.layer_name == "model.layers.1.mlp.experts":
            return None, "refused by this test"
        return plan_layer(layer, method, entries, halves)

    monkeypatch.setattr(expert_blocks, "plan_layer", refuse_layer_1)
    ours = _Blocks(tiny_moe, vllm_ctx)
    loader = _load(ours, "w4a8_fastprep")
    assert loader.last_load.layers == 1
    assert all(n.startswith("model.layers.0.") for n in loader.last_load.names)
    assert [n for n in ours.seen if ".mlp.experts." in n] == \
        [n for n in ref.seen if n.startswith("model.layers.1.mlp.experts.")]
    _assert_same(ref, ours)
    said = [r.getMessage() for r in log_lines if "load format" in r.getMessage()]
    assert len(said) == 2 and said[0] == (
        "w4a8_fastprep: load format w4a8_fastprep: 1 of 2 MoE layers load through vLLM's "
        "expert weight loader (model.layers.1.mlp.experts: refused by this test)"), said
    assert said[1].startswith(f"w4a8_fastprep: load format w4a8_fastprep: {TINY.experts * 9} "
                              "MoE expert tensors of 1 layers"), said


def test_the_blocks_are_read_while_the_model_is_given_the_rest(vllm_ctx, tiny_moe,
                                                              monkeypatch, log_lines):
    """The expert blocks load in a thread of their own while the model's
    ``load_weights`` takes the other tensors: here the blocks' load starts
    only once the model has had the first of them, and the model takes the
    next only once the blocks' load has started (a loader that read the
    blocks before or after the other tensors would wait in vain and fail);
    they are in place, and the thread gone, when the weights end; the line
    says how long the rest then waited for them."""
    import threading

    monkeypatch.setenv(expert_staging.ENV, "0")
    ref = _Blocks(tiny_moe, vllm_ctx)
    _load(ref, "auto")
    given, started, load = threading.Event(), threading.Event(), expert_blocks.load

    def after_the_first_other_tensor(plans, *args, **kwargs):
        assert given.wait(30), "the model was given no other tensor while the blocks loaded"
        started.set()
        return load(plans, *args, **kwargs)

    monkeypatch.setattr(expert_blocks, "load", after_the_first_other_tensor)
    ours = _Blocks(tiny_moe, vllm_ctx)
    loader = _loader("w4a8_fastprep")
    loader.local_expert_ids = None

    def weights():
        for n, item in enumerate(loader.get_all_weights(ours.model_config, ours)):
            given.set()
            if n == 1:
                assert started.wait(30), "the blocks did not load while the model took the rest"
            yield item

    ours.load_weights(weights())
    assert len(ours.seen) > 2 and loader.last_load.tensors == TINY.layers * TINY.experts * 9
    assert not block_threads()
    _assert_same(ref, ours)
    said = [r.getMessage() for r in log_lines if "load format" in r.getMessage()]
    assert len(said) == 1 and re.search(
        r"put in place in [\d.]+ s, beside the other tensors \(then waited for: [\d.]+ s\)$",
        said[0]), said


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_blocks_write_after_what_the_callers_stream_had_queued(vllm_ctx, tiny_moe,
                                                                  monkeypatch):
    """The blocks' own CUDA stream starts after the work the loading thread's
    stream had queued: here ~1 s of GPU time, then the expert parameters
    zeroed; the blocks' values must land after that zeroing."""
    monkeypatch.setenv(expert_staging.ENV, "0")
    ref = _Blocks(tiny_moe, vllm_ctx)
    _load(ref, "auto")
    ours = _Blocks(tiny_moe, vllm_ctx)
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))
    for layer in ours.experts():  # the parameters the blocks fill
        for name in (w + k for w in ("w13_", "w2_") for k in expert_blocks.KINDS):
            getattr(layer, name).data.zero_()
    loader = _load(ours, "w4a8_fastprep")
    torch.cuda.synchronize()
    assert loader.last_load.tensors == TINY.layers * TINY.experts * 9
    _assert_same(ref, ours)


def _failing_reads(monkeypatch):
    def failing(fd, into, offset, path):
        raise expert_blocks.LoadError(f"{path}: cannot read bytes (injected)")

    monkeypatch.setattr(expert_blocks, "_pread_all", failing)


def test_an_error_reading_the_blocks_ends_the_weights_with_it(vllm_ctx, tiny_moe,
                                                              monkeypatch):
    from vllm_w4a8_fastprep.load_checks import LoadError

    monkeypatch.setenv(expert_staging.ENV, "0")
    _failing_reads(monkeypatch)
    ours = _Blocks(tiny_moe, vllm_ctx)
    with pytest.raises(LoadError, match=r"safetensors: cannot read bytes \(injected\)$"):
        _load(ours, "w4a8_fastprep")
    assert not block_threads()


def test_weights_closed_after_the_blocks_failed_log_their_error_only(vllm_ctx, tiny_moe,
                                                                    monkeypatch, log_lines):
    """The model's ``load_weights`` failing part way (the iterator closed)
    after the blocks' own read failed: the blocks' error is logged, not
    raised (the model's error is the one that goes on)."""
    import time

    monkeypatch.setenv(expert_staging.ENV, "0")
    _failing_reads(monkeypatch)
    ours = _Blocks(tiny_moe, vllm_ctx)
    loader = _loader("w4a8_fastprep")
    loader.local_expert_ids = None
    weights = loader.get_all_weights(ours.model_config, ours)
    next(weights)
    deadline = time.monotonic() + 30
    while block_threads() and time.monotonic() < deadline:  # the blocks have failed
        time.sleep(0.01)
    weights.close()
    assert not block_threads() and loader.last_load is None
    said = [r.getMessage() for r in log_lines if "failed too" in r.getMessage()]
    assert len(said) == 1 and re.fullmatch(
        r"w4a8_fastprep: load format w4a8_fastprep: reading the expert tensors failed too "
        r"\(\S+\.safetensors: cannot read bytes \(injected\)\)", said[0]), said


def _slow_reads(monkeypatch) -> list[int]:
    """Every read of the blocks takes 0.5 s more; the offsets started."""
    import time

    pread, started = expert_blocks._pread_all, []

    def slow_read(fd, into, offset, path):
        started.append(offset)
        time.sleep(0.5)
        pread(fd, into, offset, path)

    monkeypatch.setattr(expert_blocks, "_pread_all", slow_read)
    return started


def test_weights_closed_early_stop_the_blocks_at_their_next_piece(vllm_ctx, sharded,
                                                                   monkeypatch, log_lines):
    """An interrupt or error in the model's ``load_weights`` does not wait
    for every expert block to be read: the reads under way end, no other
    starts, nothing is logged of it."""
    monkeypatch.setenv(expert_staging.ENV, "0")
    started = _slow_reads(monkeypatch)
    ours = _Blocks(sharded, vllm_ctx)
    loader = _loader("w4a8_fastprep")
    loader.local_expert_ids = None
    weights = loader.get_all_weights(ours.model_config, ours)
    next(weights)
    weights.close()
    assert not block_threads() and loader.last_load is None
    files = len(list(sharded.glob("*.safetensors")))
    assert 1 <= len(started) <= 2 < files  # piece 0, perhaps piece 1 read ahead; >= 1 per file
    assert not [r for r in log_lines if "load format w4a8_fastprep" in r.getMessage()
                and "MoE expert tensors" in r.getMessage()]


def test_an_interrupt_while_waiting_for_the_blocks_stops_them(vllm_ctx, sharded,
                                                              monkeypatch):
    """Ctrl-C (or vLLM's SIGTERM handler's exit) while the weights wait for
    the blocks: it goes on, and the blocks stop at their next piece."""
    from vllm_w4a8_fastprep import block_loader

    monkeypatch.setenv(expert_staging.ENV, "0")
    started = _slow_reads(monkeypatch)

    def interrupted(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(block_loader._BlockJob, "wait", interrupted)
    ours = _Blocks(sharded, vllm_ctx)
    with pytest.raises(KeyboardInterrupt):
        _load(ours, "w4a8_fastprep")
    for t in block_threads():
        t.join(30)
    files = len(list(sharded.glob("*.safetensors")))
    assert not block_threads() and 1 <= len(started) <= 3 < files


@pytest.mark.parametrize("case", ["shards", "multithread", "ep filter"])
def test_the_load_format_over_many_files_and_vllms_other_reads(vllm_ctx, sharded, monkeypatch,
                                                               case):
    """Many files (vLLM's file order); vLLM's multithreaded reads (its own
    iterator, the expert names dropped); vLLM's expert-parallel weight filter
    (the other tensors filtered as vLLM filters them)."""
    monkeypatch.setenv(expert_staging.ENV, "0")
    kw = {"shards": {}, "multithread": {
        "model_loader_extra_config": {"enable_multithread_load": True}},
          "ep filter": {"local_expert_ids": {0, 1, 2, 3}}}[case]
    ref = _Blocks(sharded, vllm_ctx)
    _load(ref, "auto", **kw)
    ours = _Blocks(sharded, vllm_ctx)
    loader = _load(ours, "w4a8_fastprep", **kw)
    rest = [n for n in ref.seen if n not in loader.last_load.names]
    if case == "multithread":  # files read concurrently: vLLM's order is not fixed
        ours.seen, rest = sorted(ours.seen), sorted(rest)
    assert ours.seen == rest
    assert loader.last_load.tensors == TINY.layers * TINY.experts * 9
    if case != "ep filter":  # (the filter keeps vLLM's loader from some experts' tensors)
        _assert_same(ref, ours)


def test_a_reload_through_the_load_format_goes_through_vllms_loader(vllm_ctx, tiny_moe,
                                                                    monkeypatch, log_lines):
    """vLLM's layer-wise reload with the load format: every layer was
    prepared before, so all go through vLLM's loader, and end as a fresh
    load does."""
    from vllm.model_executor.model_loader.reload import (
        finalize_layerwise_reload,
        initialize_layerwise_reload,
        record_metadata_for_reloading,
    )

    monkeypatch.setenv(expert_staging.ENV, "0")
    models = []
    for fmt in ("auto", "w4a8_fastprep"):
        model = _Blocks(tiny_moe, vllm_ctx)
        record_metadata_for_reloading(model)
        _load(model, fmt)
        for layer in model.experts():
            layer.quant_method.process_weights_after_loading(layer)
        models.append(model)
    ref, ours = models
    _assert_same(ref, ours)
    initialize_layerwise_reload(ours)
    loader = _load(ours, "w4a8_fastprep")
    finalize_layerwise_reload(ours, None)
    assert loader.last_load.tensors == 0  # no block read
    _assert_same(ref, ours)
    said = [r.getMessage() for r in log_lines if "load format" in r.getMessage()]
    assert said[-1].startswith(
        f"w4a8_fastprep: load format w4a8_fastprep: {TINY.layers} of {TINY.layers} MoE layers "
        "load through vLLM's expert weight loader (model.layers.0.mlp.experts: prepared "
        "before (a reload goes through vLLM's loader)"), said


def test_a_checkpoint_without_safetensors_loads_as_auto_and_says_so(vllm_ctx, tiny_moe,
                                                                     tmp_path, monkeypatch,
                                                                     log_lines):
    import shutil

    from safetensors.torch import load_file

    monkeypatch.setenv(expert_staging.ENV, "0")
    for f in tiny_moe.iterdir():  # the same tensors as one PyTorch .bin file
        if f.suffix not in (".safetensors",) and f.name != "model.safetensors.index.json":
            shutil.copy(f, tmp_path / f.name)
    tensors = {}
    for f in sorted(tiny_moe.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    ref = _Blocks(tiny_moe, vllm_ctx)
    _load(ref, "auto")
    ours = _Blocks(tmp_path, vllm_ctx)
    loader = _load(ours, "w4a8_fastprep")
    assert loader.last_load is None
    _assert_same(ref, ours)
    said = [r.getMessage() for r in log_lines if "load format" in r.getMessage()]
    assert said[-1] == (f"w4a8_fastprep: load format w4a8_fastprep: {TINY.layers} of "
                        f"{TINY.layers} MoE layers load through vLLM's expert weight loader "
                        "(all: the checkpoint is not safetensors)"), said


def test_a_load_under_inference_mode_reads_the_blocks_under_it_too(vllm_ctx, tiny_moe,
                                                                   monkeypatch):
    """A model built and loaded under ``torch.inference_mode`` (its
    parameters inference tensors, which only that mode may write): the
    blocks' thread takes the caller's mode."""
    monkeypatch.setenv(expert_staging.ENV, "0")
    with torch.inference_mode():
        ref = _Blocks(tiny_moe, vllm_ctx)
        _load(ref, "auto")
        ours = _Blocks(tiny_moe, vllm_ctx)
        assert ours.experts()[0].w2_weight_packed.is_inference()
        loader = _load(ours, "w4a8_fastprep")
    assert loader.last_load.tensors == TINY.layers * TINY.experts * 9
    _assert_same(ref, ours)
