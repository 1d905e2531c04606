"""One safetensors file's tensors, from its header alone, each checked as
safetensors checks it: the one reader of the opt-in load format
(``expert_blocks.py``) and of the command line's checkpoint checks
(``tools/checkpoint_check.py``).

A header is 8 bytes of little-endian length, then that many bytes of JSON:
``{name: {"dtype": "I32", "shape": [...], "data_offsets": [begin, end]},
"__metadata__": {...}}``, the offsets counted from the end of the header.
A file is refused, with one line naming what is wrong, where safetensors
(0.8) refuses it when it opens the file: a header longer than its limit or
not a UTF-8 JSON object, an entry without a dtype string or whole-number
shape and offsets (no "24" read as 24, no 2.5 as 2, no ``true`` as 1), a
dtype safetensors does not know, a byte count other than its dtype and shape
need, tensors that do not tile the data exactly (outside it, overlapping, a
gap between two, bytes after the last). Not checked: that ``__metadata__``
maps strings to strings (it is not read), and a name given twice (the last
entry is kept; the first one's bytes then fail the tiling unless both name
the same bytes). Nothing is read but the header; no torch.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, NamedTuple

#: safetensors' own limit on the header
MAX_HEADER_BYTES = 100_000_000
#: the dtypes safetensors knows, by the names its headers use, and their widths in bits
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
              "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16,
              "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64,
              "F64": 64, "I64": 64, "U64": 64}


class HeaderError(ValueError):
    """What is wrong with a file's header, in words that follow its path."""


class Tensor(NamedTuple):
    """One tensor of a safetensors file: its name there, its file, its dtype
    as safetensors names it (``I32``, ``BF16``, ...), its shape and its
    absolute byte range in the file."""

    name: str
    path: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class _Info(NamedTuple):
    """One tensor's header entry."""

    dtype: Any
    shape: Any
    data_offsets: Any


def _ints(v) -> bool:
    return isinstance(v, list) and all(type(x) is int for x in v)  # noqa: E721 (not bool)


def _decode_json(raw: bytes) -> dict[str, _Info]:
    """The header's tensor entries by the standard library's JSON reader,
    typed as safetensors types them (a dtype string, whole numbers)."""
    meta = json.loads(raw.decode("utf-8"))
    if not isinstance(meta, dict):
        raise HeaderError(f"corrupt safetensors header (a JSON {type(meta).__name__}, not an "
                          "object)")
    out = {}
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise HeaderError(f"corrupt safetensors header: tensor {name}: its entry is a JSON "
                              f"{type(info).__name__}, not an object")
        dtype, shape, offsets = (info.get(k) for k in ("dtype", "shape", "data_offsets"))
        if not isinstance(dtype, str) or not _ints(shape) or not _ints(offsets):
            raise HeaderError(f"corrupt safetensors header: tensor {name}: its entry needs a "
                              "dtype string and whole-number shape and data_offsets, has "
                              f"{info!r:.200}")
        out[name] = _Info(dtype, shape, offsets)
    return out


def _typed_decoder():
    """msgspec's typed JSON reader (a vLLM dependency), several times faster
    than ``json`` on the 50k-entry headers of large MoE checkpoints, or None."""
    try:
        import msgspec
    except ImportError:
        return None

    class Info(msgspec.Struct):  # fields absent from an entry stay None
        dtype: str | None = None
        shape: list[int] | None = None
        data_offsets: list[int] | None = None

    decode = msgspec.json.Decoder(dict[str, Info]).decode

    def entries(raw: bytes) -> dict[str, Info] | None:
        try:
            meta = decode(raw)
        except msgspec.MsgspecError:
            return None  # not the shape expected: the standard reader says what is wrong
        meta.pop("__metadata__", None)
        return meta

    return entries


_TYPED_DECODE = _typed_decoder()


def _checked(path: str, raw: bytes, size: int) -> dict[str, Tensor]:
    items = _TYPED_DECODE(raw) if _TYPED_DECODE is not None else None
    if items is None:
        items = _decode_json(raw)
    base = 8 + len(raw)
    data = size - base
    out = {}
    dtype_bits = DTYPE_BITS
    for name, info in items.items():
        dtype, shape, offsets = info.dtype, info.shape, info.data_offsets
        if dtype is None or shape is None or offsets is None or len(offsets) != 2:
            raise HeaderError(f"corrupt safetensors header: tensor {name}: its entry lacks a "
                              "dtype, a shape or the two data_offsets")
        start, end = offsets
        if not 0 <= start <= end or (shape and min(shape) < 0):
            raise HeaderError(f"corrupt safetensors header: tensor {name}: {dtype}{list(shape)} "
                              f"at data_offsets [{start}, {end}]")
        bits = dtype_bits.get(dtype)
        if bits is None:
            raise HeaderError(f"corrupt safetensors header: tensor {name}: dtype {dtype!r:.40} is "
                              "none of safetensors' dtypes")
        need = math.prod(shape) * bits
        if need != (end - start) * 8:
            raise HeaderError(f"corrupt safetensors header: tensor {name}: {dtype}{list(shape)} "
                              f"needs {need // 8 if need % 8 == 0 else f'{need} bits, not whole'} "
                              f"bytes, its data_offsets give {end - start}")
        if end > data:
            raise HeaderError(f"truncated (tensor {name} lies past the end of the file: its "
                              f"bytes end at {base + end}, the file has {size})")
        out[name] = Tensor(name, path, dtype, tuple(shape), base + start, base + end)
    at, last = base, None  # the tensors tile the data: each starts where the one before ends
    for start, end, name in sorted((t.start, t.end, t.name) for t in out.values()):
        if start < at:
            raise HeaderError(f"corrupt safetensors header: tensors {last} and {name} overlap in "
                              "the data")
        if start > at:
            raise HeaderError(f"corrupt safetensors header: no tensor holds bytes "
                              f"{at - base}-{start - base} of the data (before {name})")
        at, last = end, name
    if at != size:
        after = f"after {last}; " if last is not None else ""
        raise HeaderError(f"corrupt safetensors header: no tensor holds the data's last "
                          f"{size - at} bytes ({after}the tensors end at byte {at} of {size})")
    return out


def read_header(path: str) -> dict[str, Tensor]:
    """{name: Tensor} of one safetensors file (``__metadata__`` left out);
    HeaderError saying what is wrong (without the path) where the file
    cannot be read or safetensors would refuse it."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise HeaderError(f"truncated, or not a safetensors file (shorter than 8 bytes: "
                                  f"{size})")
            n = int.from_bytes(head, "little")
            if not 0 < n <= MAX_HEADER_BYTES:
                raise HeaderError(f"not a safetensors file (header length {n}, file size "
                                  f"{size})")
            if 8 + n > size:
                raise HeaderError(f"truncated safetensors file (a header of {n} bytes in "
                                  f"{size} bytes)")
            raw = f.read(n)
        return _checked(path, raw, size)
    except HeaderError:
        raise
    except OSError as e:
        raise HeaderError(f"cannot read it ({e.strerror or e})") from e
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError,
            RecursionError) as e:
        raise HeaderError(f"corrupt safetensors header ({e})") from e
