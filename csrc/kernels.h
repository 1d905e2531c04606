// Launchers of the w4a8_fastprep CUDA kernels: plain pointers, PyTorch-free.
// They only enqueue work on `stream` and return the launch status; argument
// checking happens before them (ops.cpp), so nothing here throws.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace w4a8_fastprep {

// int4 [N][K] row-major (uint4b8 when from_uint4b8) -> CUTLASS W4A8 layout,
// nibbles encoded. N, K multiples of 128.
cudaError_t launch_encode_reorder(bool from_uint4b8, const void* in, void* out,
                                  int64_t n_rows, int64_t k,
                                  cudaStream_t stream);

// n fp8 scales -> 8n fp8 bytes, out[8i + j] = fp8(s_i * (j - 8)).
cudaError_t launch_pack_scale_fp8(const void* in, void* out, int64_t n,
                                  cudaStream_t stream);

// Upstream QuantFP8 code path reproduced by prepare_scales.
enum ScalePath : int { kNativePath = 0, kCudaPath = 1 };

// bf16 [N, G] -> packed fp8 [8 * G * N] and fp32 [N]. N a multiple of 32.
cudaError_t launch_prepare_scales(int path, const void* weight_scale,
                                  void* packed, void* chan, int64_t n_rows,
                                  int64_t groups, cudaStream_t stream);

}  // namespace w4a8_fastprep
