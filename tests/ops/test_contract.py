"""The contract between the Python package and the compiled ops: the
constants both sides use (group size, the shape multiple, the scale-path ids,
packing factors, the input alignment) agree, as the compiled library itself
reports them (``torch.ops.w4a8_fastprep.constant``, which runs on CPU-only
machines too), and the build targets the oldest torch supported."""

import ast
import pathlib
import re

import pytest
import torch

from vllm_w4a8_fastprep import checkpoint_format, ops, reference

ROOT = pathlib.Path(__file__).resolve().parents[2]



@pytest.mark.parametrize("name", sorted(ops.CONSTANTS))
def test_compiled_constant_equals_python(extension, name):
    assert extension.constant(name) == ops.CONSTANTS[name]


def test_compiled_library_refuses_unknown_constant(extension):
    with pytest.raises(RuntimeError, match="unknown constant 'group-size'"):
        extension.constant("group-size")


def test_python_constants_are_the_ones_python_uses():
    # The table compared above is what the package really runs with.
    # the format's facts are named once, in checkpoint_format; the table is built from them
    assert ops.CONSTANTS["group_size"] == checkpoint_format.GROUP_SIZE
    assert ops.CONSTANTS["shape_multiple"] == checkpoint_format.SHAPE_MULTIPLE
    assert [ops.CONSTANTS[f"scale_path.{p}"] for p in ops.SCALE_PATHS] == list(range(len(ops.SCALE_PATHS)))
    assert ops.CONSTANTS["int4_per_int32"] == checkpoint_format.INT4_PER_INT32
    every_scale = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    assert reference.pack_scale_fp8(every_scale).numel() == 256 * ops.CONSTANTS["scale_pack_bytes"]
    multiple = ops.CONSTANTS["shape_multiple"]
    with pytest.raises(ValueError, match=f"is not a multiple of {multiple}"):
        ops.prepare_weight(torch.zeros(multiple + 64, 16, dtype=torch.int32))
    ops.prepare_weight(torch.zeros(multiple, multiple // 8, dtype=torch.int32))  # accepted


def _setup_constant(name: str):
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found in setup.py")


def test_build_targets_the_pinned_torch():
    # TORCH_TARGET_VERSION (torch/csrc/stable/version.h: major << 56 | minor << 48)
    # is the oldest torch the package supports: the one pyproject pins.
    pins = set(re.findall(r'"torch==(\d+)\.(\d+)\.\d+"', (ROOT / "pyproject.toml").read_text()))
    assert len(pins) == 1, pins
    major, minor = map(int, pins.pop())
    assert int(_setup_constant("TORCH_TARGET_VERSION"), 16) == (major << 56) | (minor << 48)


def test_loaded_library_is_checked_against_the_package(extension):
    # ops.extension_error() refuses a library built from other sources
    assert ops.extension_error() is None
    assert ops.compiled_mismatch(extension, ops.CONSTANTS) is None
    changed = {**ops.CONSTANTS, "scale_path.cuda": 2}
    assert "has scale_path.cuda = 1 but this package has 2" in ops.compiled_mismatch(extension, changed)

    class OldLibrary:  # a build from before the grouped ops
        def __getattr__(self, name):
            if "grouped" in name or name == "constant":
                raise AttributeError(name)
            return getattr(extension, name)

    msg = ops.compiled_mismatch(OldLibrary(), ops.CONSTANTS)
    assert "lacks the ops ['prepare_weight_grouped'" in msg and "rebuild it" in msg
