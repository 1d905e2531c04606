// Launchers of the w4a8_fastprep CUDA kernels: plain pointers, PyTorch-free.
// They only enqueue work on `stream` and return the launch status; argument
// checking happens before them (ops.cpp), so nothing here throws.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace w4a8_fastprep {

// Constants shared with Python (reference.py / ops.py). The op
// w4a8_fastprep::constant(name) returns them, and tests/ops/test_contract.py
// checks that Python agrees.
constexpr int64_t kGroupSize = 128;       // int4 values per group scale
constexpr int64_t kShapeMultiple = 128;   // K and N must be multiples of this
constexpr int64_t kInt4PerInt32 = 8;      // checkpoint packing
constexpr int64_t kScalePackBytes = 8;    // fp8 bytes per packed group scale
constexpr int64_t kInputAlignment = 16;   // bytes; the weight kernel loads 16 B
constexpr int64_t kMaxExperts = 65535;    // grid.y of the grouped weight kernel

// Upstream QuantFP8 code path reproduced by prepare_scales.
enum ScalePath : int { kNativePath = 0, kCudaPath = 1 };

// num_experts int4 [N][K] row-major matrices, one after the other (uint4b8
// when from_uint4b8) -> the CUTLASS W4A8 layout of each, nibbles encoded,
// expert e at byte offset e * N * K / 2. One launch (two when K % 512 != 0).
// N, K multiples of 128; `in` and `out` 16-byte aligned.
cudaError_t launch_encode_reorder(bool from_uint4b8, const void* in, void* out,
                                  int64_t n_rows, int64_t k,
                                  int64_t num_experts, cudaStream_t stream);

// n fp8 scales -> 8n fp8 bytes, out[8i + j] = fp8(s_i * (j - 8)).
cudaError_t launch_pack_scale_fp8(const void* in, void* out, int64_t n,
                                  cudaStream_t stream);

// num_experts bf16 [N, G] matrices -> per expert packed fp8 [8 * G * N]
// (expert e at element 8 * e * G * N) and fp32 [N] (at e * N). N a multiple
// of 128 (a block owns 32 rows of one expert). One launch.
cudaError_t launch_prepare_scales(int path, const void* weight_scale,
                                  void* packed, void* chan, int64_t n_rows,
                                  int64_t groups, int64_t num_experts,
                                  cudaStream_t stream);

}  // namespace w4a8_fastprep
