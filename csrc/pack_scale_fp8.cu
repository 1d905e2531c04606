// pack_scale_fp8: drop-in for vLLM's cutlass_pack_scale_fp8, on the GPU.
// fp8 e4m3 scales (contiguous, e.g. (K/128, N)) -> 1-D fp8 of 8x the elements:
// out[8*i + j] = fp8(s_i * (j - 8)), j = 0..7 (RNE, saturating; NaN -> 0x7F).
#include <algorithm>

#include "fp8_scales.cuh"
#include "kernels.h"

namespace w4a8_fastprep {

__global__ void pack_scale_fp8_kernel(const uint8_t* __restrict__ in,
                                      uint64_t* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < n; i += stride) {
    out[i] = pack8(in[i]);
  }
}

cudaError_t launch_pack_scale_fp8(const void* in, void* out, int64_t n,
                                  cudaStream_t stream) {
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 1 << 20);
  pack_scale_fp8_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<const uint8_t*>(in), static_cast<uint64_t*>(out), n);
  return cudaGetLastError();
}

}  // namespace w4a8_fastprep
