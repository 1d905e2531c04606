"""Synthetic W4AFP8 checkpoints: Llama-shaped (dense) or Qwen3-MoE-shaped
(mixture of experts), random but valid tensors, written straight in the
compressed-tensors ``pack-quantized`` format (what llm-compressor saves for the
``W4AFP8`` scheme, experts named one by one as llm-compressor names them), with
a tokenizer built offline. For tests, benchmarks and startup-time measurements
where no real weights can be downloaded; the outputs of such a model are
meaningless but deterministic, which is what bit-exactness checks need.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..checkpoint_format import GROUP_SIZE, INT4_PER_INT32
from .errors import signals_deferred
from .model_shapes import ARCHS

WEIGHT_ARGS = {
    "num_bits": 4, "type": "int", "symmetric": True, "group_size": GROUP_SIZE,
    "strategy": "group", "block_structure": None, "dynamic": False, "actorder": None,
    "observer": "minmax", "observer_kwargs": {},
}
INPUT_ARGS = {
    "num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
    "strategy": "token", "block_structure": None, "dynamic": True, "actorder": None,
    "observer": None, "observer_kwargs": {},
}


def quantization_config(moe: bool = False) -> dict:
    """The ``quantization_config`` of a W4AFP8 pack-quantized checkpoint.
    ``moe``: the MoE routers (``mlp.gate``) stay bf16, as llm-compressor's
    recipes for MoE models leave them."""
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": dict(WEIGHT_ARGS),
                "input_activations": dict(INPUT_ARGS),
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ["lm_head", "re:.*mlp.gate$"] if moe else ["lm_head"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
    }


@dataclass(frozen=True)
class Preset:
    hidden: int
    intermediate: int  # dense MLP (0: every MLP is a mixture of experts)
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    head_dim: int | None = None
    experts: int = 0  # routed experts per layer (0: dense, Llama-shaped)
    moe_intermediate: int = 0
    experts_per_token: int = 0

    @property
    def moe(self) -> bool:
        return self.experts > 0


def _from_arch(name: str, layers: int, vocab: int, experts_per_token: int = 0) -> Preset:
    a = ARCHS[name]
    return Preset(hidden=a.hidden, intermediate=a.intermediate, layers=layers, heads=a.heads,
                  kv_heads=a.kv_heads, vocab=vocab, head_dim=a.head_dim, experts=a.experts,
                  moe_intermediate=a.moe_intermediate, experts_per_token=experts_per_token)


PRESETS = {
    "tiny": Preset(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=512),
    "1b": Preset(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=32000),
    "8b": _from_arch("llama3-8b", layers=32, vocab=32000),
    "70b": _from_arch("llama3-70b", layers=80, vocab=32000),
    # MoE: a Qwen3MoeForCausalLM; attention and experts W4AFP8, routers bf16
    "tiny-moe": Preset(hidden=256, intermediate=0, layers=2, heads=4, kv_heads=2, vocab=512,
                       head_dim=64, experts=8, moe_intermediate=256, experts_per_token=2),
    "qwen3-30b-a3b": _from_arch("qwen3-30b-a3b", layers=48, vocab=151936, experts_per_token=8),
    # DeepSeek-V3's count of routed-expert tensors (58 MoE layers x 256 experts x 9 =
    # 133,632: what per-tensor loading costs scale with) on Qwen3-30B-A3B's expert
    # shape, so that it fits one GPU machine (~36 GB)
    "moe-58x256": replace(_from_arch("qwen3-30b-a3b", layers=58, vocab=151936,
                                     experts_per_token=8), experts=256),
}


def preset(name: str, layers: int | None = None) -> Preset:
    """The preset ``name``, with ``layers`` decoder layers if given."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[name]
    if layers is None:
        return p
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be a positive whole number of decoder layers, "
                         f"got {layers!r}")
    return replace(p, layers=layers)


def linear_shapes(p: Preset) -> dict[str, tuple[int, int]]:
    """(N, K) of each quantized Linear of one decoder layer (without the
    experts of a MoE layer: see ``expert_shapes``)."""
    hd = p.head_dim or p.hidden // p.heads
    shapes = {
        "self_attn.q_proj": (p.heads * hd, p.hidden),
        "self_attn.k_proj": (p.kv_heads * hd, p.hidden),
        "self_attn.v_proj": (p.kv_heads * hd, p.hidden),
        "self_attn.o_proj": (p.hidden, p.heads * hd),
    }
    if not p.moe:
        shapes.update({
            "mlp.gate_proj": (p.intermediate, p.hidden),
            "mlp.up_proj": (p.intermediate, p.hidden),
            "mlp.down_proj": (p.hidden, p.intermediate),
        })
    return shapes


def expert_shapes(p: Preset) -> dict[str, tuple[int, int]]:
    """(N, K) of each projection of one expert (empty for a dense preset)."""
    if not p.moe:
        return {}
    return {
        "gate_proj": (p.moe_intermediate, p.hidden),
        "up_proj": (p.moe_intermediate, p.hidden),
        "down_proj": (p.hidden, p.moe_intermediate),
    }


def random_w4afp8_linear(n: int, k: int, gen: torch.Generator, device="cpu") -> dict:
    """Random checkpoint tensors of one Linear: weight_packed, weight_scale,
    weight_shape. The group scales are uniform in [0.5, 1.5) / (4 sqrt(K)); with
    int4 values uniform in -8..7 (mean square 21.5) a weight's RMS is then
    ~1.2 / sqrt(K), so a layer's outputs keep about the size of its inputs."""
    if n % GROUP_SIZE or k % GROUP_SIZE:
        raise ValueError(f"N={n} and K={k} must be multiples of {GROUP_SIZE}")
    packed = torch.randint(-(2**31), 2**31 - 1, (n, k // INT4_PER_INT32), dtype=torch.int32,
                           generator=gen, device=device)
    base = 1.0 / (4.0 * math.sqrt(k))
    scale = (torch.rand(n, k // GROUP_SIZE, generator=gen, device=device) + 0.5) * base
    return {
        "weight_packed": packed,
        "weight_scale": scale.to(torch.bfloat16),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }


def random_w4afp8_experts(experts: int, n: int, k: int, gen: torch.Generator,
                          device="cpu") -> dict:
    """``random_w4afp8_linear`` for ``experts`` experts at once, stacked on a
    leading expert dimension: weight_packed ``(E, N, K/8)``, weight_scale
    ``(E, N, K/128)``, weight_shape ``(E, 2)``."""
    if experts < 1:
        raise ValueError(f"experts must be >= 1, got {experts}")
    if n % GROUP_SIZE or k % GROUP_SIZE:
        raise ValueError(f"N={n} and K={k} must be multiples of {GROUP_SIZE}")
    packed = torch.randint(-(2**31), 2**31 - 1, (experts, n, k // INT4_PER_INT32), dtype=torch.int32,
                           generator=gen, device=device)
    base = 1.0 / (4.0 * math.sqrt(k))
    scale = (torch.rand(experts, n, k // GROUP_SIZE, generator=gen, device=device) + 0.5) * base
    return {
        "weight_packed": packed,
        "weight_scale": scale.to(torch.bfloat16),
        "weight_shape": torch.tensor([[n, k]] * experts, dtype=torch.int64),
    }


TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. Question: what is 12 plus 30? "
    "Answer: 42. Natalia sold clips to 48 of her friends in April, and then she sold "
    "half as many clips in May. How many clips did Natalia sell altogether? "
    "#### 72 The answer is 72. Weights are int4, activations are fp8. "
)


def write_tokenizer(out: Path, vocab_size: int) -> int:
    """A byte-level BPE tokenizer trained in memory (no download). Returns
    its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 400), special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TOKENIZER_TEXT] * 8, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(out))
    return tok.get_vocab_size()


class _ShardWriter:
    """safetensors shards of at most ``shard_bytes`` (one tensor may exceed it)."""

    def __init__(self, out: Path, shard_bytes: int):
        self.out, self.shard_bytes = out, shard_bytes
        self.tensors: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}

    def put(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.size and self.size + nbytes > self.shard_bytes:
            self.flush()
        self.tensors[name] = t.contiguous().cpu()
        self.size += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.tensors:
            return
        fname = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.tensors, str(self.out / fname), metadata={"format": "pt"})
        # safetensors writes 0600 whatever the umask: as the checkpoint's other files (as
        # the umask allows, as the folder made for them), so that a vLLM run by another
        # user reads it
        os.chmod(self.out / fname, self.out.stat().st_mode & 0o666)
        self.weight_map.update(dict.fromkeys(self.tensors, fname))
        self.files.append(fname)
        self.tensors, self.size = {}, 0


def hf_config(p: Preset, vocab: int) -> dict:
    """The model's ``config.json`` (without ``quantization_config``)."""
    hd = p.head_dim or p.hidden // p.heads
    common = {
        "hidden_size": p.hidden, "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads, "num_key_value_heads": p.kv_heads, "head_dim": hd,
        "vocab_size": vocab, "max_position_embeddings": 4096, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 0, "eos_token_id": 1,
    }
    if not p.moe:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "intermediate_size": p.intermediate, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, **common}
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "intermediate_size": p.intermediate, "moe_intermediate_size": p.moe_intermediate,
            "num_experts": p.experts, "num_experts_per_tok": p.experts_per_token,
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "output_router_logits": False,
            **common}


def write_checkpoint(out_dir: str | Path, preset_name: str = "tiny", layers: int | None = None,
                     seed: int = 0, device: str = "cpu", shard_bytes: int = 4 << 30,
                     progress: bool = False, force: bool = False) -> Path:
    """Write a synthetic W4AFP8 checkpoint; returns its folder.

    Dense presets give a ``LlamaForCausalLM``; MoE presets a
    ``Qwen3MoeForCausalLM`` whose experts are stored one by one
    (``model.layers.L.mlp.experts.E.{gate,up,down}_proj.{weight_packed,
    weight_scale, weight_shape}``) beside a bf16 router ``mlp.gate``.

    ``out_dir`` must not exist or be an empty folder (``force``: write into a
    non-empty one, replacing files of the same names); ``ValueError``
    otherwise, naming it.

    Never leaves a half-written checkpoint at ``out_dir``: the checkpoint is
    written into a hidden temporary folder (see ``staged_folder``) and put in
    place only once complete; an error, Ctrl-C or SIGTERM (made an exception
    by ``errors.exit_on_signals``) removes the temporary folder and leaves
    ``out_dir`` as it was."""
    p = preset(preset_name, layers)
    out = Path(out_dir)
    check_out_dir(out, force)
    with staged_folder(out) as stage:
        _write(stage, p, preset_name, seed, device, shard_bytes, progress)
    return out


def check_out_dir(out: Path, force: bool = False) -> None:
    """``ValueError`` naming ``out`` unless a checkpoint may be written there:
    a new folder or an empty one (``force``: any folder)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if out.is_dir() and not force and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty (choose a new folder, or --force "
                         "to write into it)")


PARTIAL = ".w4a8_fastprep-partial-"  # the temporary folders' names start so


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new folder in ``parent`` (mode as the umask allows, unlike mkdtemp's
    0700: it may become the checkpoint's folder)."""
    while True:
        path = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


@contextlib.contextmanager
def staged_folder(out: Path):
    """A temporary folder to write ``out``'s files into, put in place when the
    block ends without an exception and removed when it raises (anything,
    KeyboardInterrupt and ``errors.Terminated`` included).

    A new ``out``: the temporary folder is its sibling and is renamed to
    ``out`` (one atomic rename; the missing parents are made first, and
    removed again, those this call made, when it fails). An existing folder:
    the temporary folder is inside it (the same file system even when ``out``
    is a mount point or a link) and its files are moved into ``out`` one
    rename each, replacing files of the same names and keeping the others,
    with Ctrl-C and SIGTERM held back meanwhile."""
    new = not out.is_dir()
    made: list[Path] = []  # the parents made here, outermost first
    stage = None
    try:
        if new:
            _make_parents(out.parent, made)
            stage = _new_folder(out.parent, f".{out.name}{PARTIAL}")
        else:
            stage = _new_folder(out, PARTIAL)
        yield stage
        with signals_deferred():
            if new:  # fails, changing nothing, if a non-empty out appeared meanwhile
                stage.rename(out)
            else:
                for f in sorted(stage.iterdir()):
                    os.replace(f, out / f.name)
                stage.rmdir()
    except BaseException:
        with signals_deferred():
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
            for parent in reversed(made):
                try:
                    parent.rmdir()
                except OSError:  # no longer empty: someone else's files are in it
                    break
        raise


def _make_parents(folder: Path, made: list[Path]) -> None:
    """``folder`` and its missing parents, each appended to ``made`` once made
    (outermost first); those another process makes meanwhile are not listed."""
    missing = []
    while not folder.is_dir() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if not d.is_dir():
                raise
            continue
        made.append(d)


def _write(out: Path, p: Preset, preset_name: str, seed: int, device: str, shard_bytes: int,
           progress: bool) -> None:
    """The checkpoint's files, written into the folder ``out``."""
    tok_vocab = write_tokenizer(out, p.vocab)
    vocab = max(p.vocab, tok_vocab)
    config = {**hf_config(p, vocab), "quantization_config": quantization_config(moe=p.moe)}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))

    gen = torch.Generator(device=device).manual_seed(seed)

    def dense(*shape, std):
        return (torch.randn(*shape, generator=gen, device=device) * std).to(torch.bfloat16)

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    writer = _ShardWriter(out, shard_bytes)
    put = writer.put
    put("model.embed_tokens.weight", dense(vocab, p.hidden, std=0.02))
    layer_iter = range(p.layers)
    if progress:
        from tqdm import tqdm

        layer_iter = tqdm(layer_iter, desc=f"writing {preset_name} checkpoint", unit="layer")
    hd = p.head_dim or p.hidden // p.heads
    for i in layer_iter:
        pre = f"model.layers.{i}."
        put(pre + "input_layernorm.weight", ones(p.hidden))
        put(pre + "post_attention_layernorm.weight", ones(p.hidden))
        if p.moe:  # Qwen3: RMSNorm of q and k per head
            put(pre + "self_attn.q_norm.weight", ones(hd))
            put(pre + "self_attn.k_norm.weight", ones(hd))
            put(pre + "mlp.gate.weight", dense(p.experts, p.hidden, std=0.02))
        for name, (n, k) in linear_shapes(p).items():
            for tname, t in random_w4afp8_linear(n, k, gen, device).items():
                put(f"{pre}{name}.{tname}", t)
        for proj, (n, k) in expert_shapes(p).items():
            stacked = {t: v.cpu() for t, v in
                       random_w4afp8_experts(p.experts, n, k, gen, device).items()}
            for e in range(p.experts):
                for tname, t in stacked.items():  # own storage: safetensors refuses views
                    put(f"{pre}mlp.experts.{e}.{proj}.{tname}", t[e].clone())
    put("model.norm.weight", ones(p.hidden))
    put("lm_head.weight", dense(vocab, p.hidden, std=0.02))
    writer.flush()
    index = {"metadata": {"total_size": sum((out / f).stat().st_size for f in writer.files)},
             "weight_map": writer.weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (out / "w4a8_fastprep_synthetic.json").write_text(
        json.dumps({"preset": preset_name, **asdict(p), "seed": seed}, indent=1))
