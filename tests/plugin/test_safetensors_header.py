"""One safetensors header reader (``safetensors_header.py``) for the load
format and the command line: what it reads equals what was written, with
msgspec's typed JSON reader and with the standard library's; every file
safetensors refuses is one HeaderError saying what is wrong."""

import json

import pytest
import torch
from safetensors_files import rewrite_entry, rewrite_header, write_safetensors

from vllm_w4a8_fastprep import safetensors_header as sh


def _tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    out = []
    for e in range(3):
        p = f"model.layers.0.mlp.experts.{e}.down_proj"
        out += [(f"{p}.weight_packed", torch.randint(-2**31, 2**31 - 1, (256, 16), generator=g,
                                                     dtype=torch.int32)),
                (f"{p}.weight_scale", torch.randn(256, 1, generator=g).to(torch.bfloat16)),
                (f"{p}.weight_shape", torch.tensor([256, 128]))]
    return out + [("model.norm.weight", torch.randn(128, generator=g, dtype=torch.float32)),
                  ("empty", torch.zeros(0, 4, dtype=torch.float16))]


@pytest.fixture(params=["msgspec", "json"])
def header_reader(request, monkeypatch):
    """Each of the two JSON readers: msgspec's typed one (vLLM's dependency)
    and the standard library's (where msgspec is missing or the header is not
    of the expected shape)."""
    if request.param == "json":
        monkeypatch.setattr(sh, "_TYPED_DECODE", None)
    elif sh._TYPED_DECODE is None:
        pytest.skip("msgspec is not installed")
    return request.param


def test_the_entries_are_what_was_written(tmp_path, header_reader):
    path = tmp_path / "m.safetensors"
    items = _tensors()
    write_safetensors(path, items)
    rewrite_header(path, lambda h: h.update(__metadata__={"format": "pt", "note": "strings"}))
    got = sh.read_header(str(path))
    assert list(got) == [n for n, _ in items] and "__metadata__" not in got
    raw = path.read_bytes()
    for name, t in items:
        e = got[name]
        assert (e.name, e.path, e.shape) == (name, str(path), tuple(t.shape))
        assert raw[e.start:e.end] == t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
    assert got["model.layers.0.mlp.experts.1.down_proj.weight_scale"].dtype == "BF16"


def test_both_readers_read_the_same_entries(tmp_path, monkeypatch):
    if sh._TYPED_DECODE is None:
        pytest.skip("msgspec is not installed")
    path = tmp_path / "m.safetensors"
    write_safetensors(path, _tensors())
    rewrite_header(path, lambda h: h.update(__metadata__={"format": "pt"}))
    raw = path.read_bytes()
    assert sh._TYPED_DECODE(raw[8:8 + int.from_bytes(raw[:8], "little")]) is not None
    typed = sh.read_header(str(path))
    monkeypatch.setattr(sh, "_TYPED_DECODE", None)
    assert sh.read_header(str(path)) == typed


NAME = "model.layers.0.mlp.experts.1.down_proj.weight_packed"


@pytest.mark.parametrize("change, said", [
    (lambda e: e.pop("dtype"), "its entry "),
    (lambda e: e.pop("shape"), "its entry "),
    (lambda e: e.pop("data_offsets"), "its entry "),
    (lambda e: e.update(shape=[str(d) for d in e["shape"]]), "its entry needs "),
    (lambda e: e.update(shape=[float(d) + 0.5 for d in e["shape"]]), "its entry needs "),
    (lambda e: e.update(shape=[True] + e["shape"][1:]), "its entry needs "),
    (lambda e: e.update(data_offsets=[str(v) for v in e["data_offsets"]]), "its entry needs "),
    (lambda e: e.update(shape=[1e400]), "its entry needs "),
    (lambda e: e.update(dtype=7), "its entry needs "),
    (lambda e: e.update(data_offsets=e["data_offsets"] + [0]), "its entry "),
], ids=["no dtype", "no shape", "no offsets", "shape strings", "shape floats", "shape bool",
        "offset strings", "infinite", "dtype number", "three offsets"])
def test_an_entry_safetensors_would_refuse_is_one_error_naming_the_tensor(tmp_path, change, said,
                                                                        header_reader):
    """Not quietly read as numbers ("24" as (2, 4), 2.5 as 2, true as 1)."""
    path = tmp_path / "typed.safetensors"
    write_safetensors(path, _tensors())
    rewrite_entry(path, NAME, change)
    with pytest.raises(sh.HeaderError) as e:
        sh.read_header(str(path))
    assert str(e.value).startswith(f"corrupt safetensors header: tensor {NAME}: {said}"), e.value


@pytest.mark.parametrize("change, said", [
    (lambda o: [o[0], o[1] - 64], "I32[256, 16] needs 16384 bytes, its data_offsets give 16320"),
    (lambda o: [-8, o[1]], "I32[256, 16] at data_offsets [-8, "),
    (lambda o: [o[1], o[0]], "I32[256, 16] at data_offsets ["),
    (lambda o: [o[0] + (1 << 30), o[1] + (1 << 30)], None),
], ids=["shorter than its shape", "negative", "reversed", "past the end"])
def test_a_tensor_whose_bytes_do_not_fit_its_header_is_one_error_naming_it(tmp_path, change, said,
                                                                          header_reader):
    """As safetensors refuses such a file: never a neighbour's bytes read as
    the tensor's."""
    path = tmp_path / "hdr.safetensors"
    write_safetensors(path, _tensors())
    rewrite_entry(path, NAME, lambda e: e.update(data_offsets=change(e["data_offsets"])))
    with pytest.raises(sh.HeaderError) as e:
        sh.read_header(str(path))
    if said is None:
        assert str(e.value).startswith(f"truncated (tensor {NAME} lies past the end of the file: "
                                       "its bytes end at "), e.value
    else:
        assert str(e.value).startswith(f"corrupt safetensors header: tensor {NAME}: {said}"), \
            e.value


def test_a_file_cut_short_is_truncated_naming_the_tensor_past_its_end(tmp_path):
    path = tmp_path / "cut.safetensors"
    write_safetensors(path, _tensors())
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:size - 100])
    with pytest.raises(sh.HeaderError, match=r"^truncated \(tensor model\.norm\.weight lies past "
                                             rf"the end of the file: its bytes end at \d+, the "
                                             rf"file has {size - 100}\)$"):
        sh.read_header(str(path))


def test_overlapping_tensors_are_one_error_naming_both(tmp_path, header_reader):
    path = tmp_path / "overlap.safetensors"
    write_safetensors(path, [("a", torch.zeros(8, dtype=torch.int32)),
                             ("b", torch.ones(8, dtype=torch.int32))])
    rewrite_entry(path, "b", lambda e: e.update(data_offsets=[16, 48]))
    with pytest.raises(sh.HeaderError, match="^corrupt safetensors header: tensors a and b "
                                             "overlap in the data$"):
        sh.read_header(str(path))


@pytest.mark.parametrize("content, said", [
    (b"", "truncated, or not a safetensors file (shorter than 8 bytes: 0)"),
    (b"\x01\x02", "truncated, or not a safetensors file (shorter than 8 bytes: 2)"),
    ((0).to_bytes(8, "little") + b"{}", "not a safetensors file (header length 0, file size 10)"),
    ((1 << 40).to_bytes(8, "little"), f"not a safetensors file (header length {1 << 40}, file "
                                      "size 8)"),
    ((100_000_001).to_bytes(8, "little") + b"{}", "not a safetensors file (header length "
                                                  "100000001, file size 10)"),
    ((1000).to_bytes(8, "little") + b"{}", "truncated safetensors file (a header of 1000 bytes "
                                           "in 10 bytes)"),
    ((5).to_bytes(8, "little") + b"{nope", "corrupt safetensors header ("),
    ((2).to_bytes(8, "little") + b"[]", "corrupt safetensors header (a JSON list, not an object)"),
    ((8).to_bytes(8, "little") + b'{"a": 1}', "corrupt safetensors header: tensor a: its entry is "
                                              "a JSON int, not an object"),
    ((12).to_bytes(8, "little") + json.dumps({"a": 0}).encode("utf-16")[:12],
     "corrupt safetensors header ("),
], ids=["empty", "short", "zero header", "huge header", "over the limit", "header past the end",
         "not json",
        "a list", "entry not an object", "not utf-8"])
def test_a_bad_header_is_one_error(tmp_path, header_reader, content, said):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(sh.HeaderError) as e:
        sh.read_header(str(path))
    assert str(e.value).startswith(said), e.value


def test_a_file_that_cannot_be_read_says_so(tmp_path):
    with pytest.raises(sh.HeaderError, match=r"^cannot read it \(No such file or directory\)$"):
        sh.read_header(str(tmp_path / "missing.safetensors"))
    with pytest.raises(sh.HeaderError, match=r"^cannot read it \(Is a directory\)$"):
        sh.read_header(str(tmp_path))


def _file(path, entries: dict, data: bytes) -> None:
    h = json.dumps(entries).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)


def _entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# (entries, data bytes): files safetensors opens and files it refuses
FILES = {
    "two tensors": ({"a": _entry("I32", [2], 0, 8), "b": _entry("BF16", [3], 8, 14)}, 14),
    "sub-byte dtypes": ({"a": _entry("F4", [4], 0, 2), "b": _entry("F6_E2M3", [4], 2, 5)}, 5),
    "an empty tensor": ({"a": _entry("F32", [0, 3], 0, 0), "b": _entry("U8", [2], 0, 2)}, 2),
    "no tensors": ({}, 0),
    "fnuz and e8m0": ({"a": _entry("F8_E4M3FNUZ", [2], 0, 2), "b": _entry("F8_E8M0", [1], 2, 3)},
                      3),
    "a gap": ({"a": _entry("I32", [1], 0, 4), "b": _entry("I32", [1], 8, 12)}, 12),
    "a gap first": ({"a": _entry("I32", [1], 4, 8)}, 8),
    "bytes after the data": ({"a": _entry("I32", [1], 0, 4)}, 12),
    "bytes and no tensors": ({}, 4),
    "overlap": ({"a": _entry("I32", [2], 0, 8), "b": _entry("I32", [1], 4, 8)}, 8),
    "unknown dtype": ({"a": _entry("XYZ", [1], 0, 1)}, 1),
    "sub-byte, not whole bytes": ({"a": _entry("F4", [3], 0, 2)}, 2),
    "too few bytes": ({"a": _entry("I64", [2], 0, 8)}, 8),
    "past the end": ({"a": _entry("I32", [4], 0, 16)}, 8),
}


@pytest.mark.parametrize("case", sorted(FILES))
def test_refuses_exactly_what_safetensors_refuses(tmp_path, case, header_reader):
    safetensors = pytest.importorskip("safetensors")
    entries, size = FILES[case]
    path = tmp_path / "f.safetensors"
    _file(path, entries, bytes(range(size)))
    try:
        with safetensors.safe_open(str(path), "np") as f:
            names = sorted(f.keys())
        theirs = None
    except Exception as e:  # noqa: BLE001  (safetensors' own error type)
        theirs = str(e)
    try:
        ours, why = sorted(sh.read_header(str(path))), None
    except sh.HeaderError as e:
        ours, why = None, str(e)
    assert (why is None) == (theirs is None), (case, why, theirs)
    if why is None:
        assert ours == names
    else:
        assert why.startswith(("corrupt safetensors header: ", "truncated (tensor ")), why
