"""Runs every CUDA op once on a few shapes; meant to run under
``compute-sanitizer --tool memcheck`` (see test_sanitizer.py)."""

import sys

import torch

from vllm_w4a8_fastprep import ops, reference as ref

SHAPES = [(128, 128), (384, 5504), (5504, 384), (256, 640), (128, 33792)]


def main() -> int:
    for n, k in SHAPES:
        w = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda")
        ws = (torch.rand(n, k // 128, device="cuda") + 1e-3).to(torch.bfloat16)
        assert torch.equal(ops.prepare_weight(w), ref.prepare_weight(w))
        assert torch.equal(ops.encode_and_reorder_int4b(w.t()), ref.encode_and_reorder_int4b(w.t()))
        for path in ops.SCALE_PATHS:
            packed, chan = ops.prepare_scales(ws, path)
            rp, rc = ref.prepare_scales(ws, path)
            assert torch.equal(packed.view(torch.uint8), rp.view(torch.uint8)) and torch.equal(chan, rc)
        s = ws.to(torch.float8_e4m3fn)
        assert torch.equal(ops.pack_scale_fp8(s).view(torch.uint8), ref.pack_scale_fp8(s).view(torch.uint8))
    torch.cuda.synchronize()
    print(f"sanitize_kernels: {len(SHAPES)} shapes OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
