"""safetensors files written byte by byte, in the order a test gives (the
library's own writer sorts the tensors), and their headers rewritten."""

import json

import torch

ST_DTYPES = {torch.int32: "I32", torch.int64: "I64", torch.bfloat16: "BF16",
             torch.float16: "F16", torch.float32: "F32", torch.uint8: "U8"}


def write_safetensors(path, items: list[tuple[str, torch.Tensor]]) -> None:
    """A safetensors file holding ``items`` in this order."""
    header, blobs, at = {}, [], 0
    for name, t in items:
        raw = t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() \
            if t.numel() else b""
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
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


def rewrite_header(path, change) -> None:
    """The file with ``change`` applied to its parsed header (a dict)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8:8 + n])
    change(head)
    h = json.dumps(head).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])


def rewrite_entry(path, name, change) -> None:
    """The file with ``change`` applied to one tensor's header entry."""
    rewrite_header(path, lambda head: change(head[name]))
