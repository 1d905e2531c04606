"""One table of this package's registered ops (``torch.ops.w4a8_fastprep``, listed in
``ops.OP_NAMES``): for each, sample inputs on the CPU and what opcheck may leave out.
The op tests that apply to every op (fake tensors, opcheck) iterate it; a test checks that
it names every op, so a new op is not forgotten."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from gpu_inputs import randint32

FP8 = torch.float8_e4m3fn

# opcheck's schema test multiplies tensors, which PyTorch's CPU backend does
# not implement for fp8; ops with fp8 inputs or outputs skip that one test.
NO_FP8_MUL = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def packed(n, k, gen=None):
    """Checkpoint int4 weights ``(N, K/8)`` int32 on the CPU: every bit pattern."""
    return randint32((n, k // 8), device="cpu", generator=gen)


def packed_grouped(e, n, k, gen=None):
    return randint32((e, n, k // 8), device="cpu", generator=gen)


def scales(n, g, gen=None):
    return (torch.rand(n, g, generator=gen) * 0.01 + 1e-4).to(torch.bfloat16)


def scales_grouped(e, n, g, gen=None):
    return (torch.rand(e, n, g, generator=gen) * 0.01 + 1e-4).to(torch.bfloat16)


class OpCase(NamedTuple):
    """Inputs of one call (a function, so each test draws its own), and the opcheck
    tests to run on it (None: all of them; fewer where fp8 tensors rule one out)."""
    inputs: Callable[[], tuple]
    test_utils: tuple[str, ...] | None = None


# name -> calls to check (several where an argument picks a code path)
OP_CASES: dict[str, list[OpCase]] = {
    "prepare_weight": [OpCase(lambda: (packed(256, 384),))],
    "encode_and_reorder_int4b": [OpCase(lambda: (packed(256, 384).t(),))],
    "pack_scale_fp8": [OpCase(lambda: (scales(256, 3).to(FP8),), NO_FP8_MUL)],
    "prepare_scales": [OpCase(lambda p=p: (scales(256, 3), p), NO_FP8_MUL) for p in range(2)],
    "prepare_weight_grouped": [OpCase(lambda: (packed_grouped(3, 256, 384),))],
    "encode_and_reorder_int4b_grouped": [OpCase(lambda: (packed_grouped(3, 256, 384),))],
    "prepare_scales_grouped": [OpCase(lambda p=p: (scales_grouped(3, 256, 3), p), NO_FP8_MUL)
                               for p in range(2)],
}
#: ops that take no tensor (nothing to fake or opcheck): checked by tests/ops/test_contract.py
NOT_TENSOR_OPS = ("constant",)


def cases():
    """(id, op name, case) for every call in the table, for ``pytest.mark.parametrize``."""
    return [(f"{name}-{i}" if len(calls) > 1 else name, name, case)
            for name, calls in OP_CASES.items() for i, case in enumerate(calls)]
