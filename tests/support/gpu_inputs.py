"""Inputs shared by the GPU tests of the ops (dense and grouped)."""

import torch

FP8 = torch.float8_e4m3fn
U8 = torch.uint8


def is_k128(k: int) -> bool:
    """K % 256 == 128: upstream's reorder refuses it (compared via child processes)."""
    return k % 256 == 128


def randint32(shape, device="cuda", generator=None):
    """Random packed int4 words: every bit pattern possible."""
    return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, device=device,
                         generator=generator)


def rand_scales(*shape, device="cuda"):
    """bf16 group scales of ``shape`` (..., K/128): realistic magnitudes plus
    a spread of exponents per row, never all equal."""
    rows = tuple(shape[:-1]) + (1,)
    x = torch.rand(shape, device=device) * torch.exp2(
        torch.randint(-14, 2, rows, device=device).float())
    return (x + 1e-6).to(torch.bfloat16)
