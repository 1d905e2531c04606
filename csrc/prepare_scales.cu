// prepare_scales: checkpoint bf16 group scales [N, G] (G = K/128) ->
//   packed fp8 1-D [8 * G * N] (what cutlass_w4a8_mm takes) and
//   fp32 channel scales [N, 1],
// in one pass, equal to vLLM's convert_bf16_scales_to_fp8 (dynamic per-row
// fp8 quantisation, /8 and x8) + transpose + cutlass_pack_scale_fp8.
//
// A block owns 32 rows: its warps find each row's absolute maximum (coalesced
// over the row), then all threads walk (g, n) with n fastest, so that every
// warp writes 32 x 8 = 256 contiguous output bytes.
//
// Grouped (MoE) scales [E, N, G]: the E * N rows are numbered globally (N is
// a multiple of 32, so a block never straddles two experts); expert e's
// packed scales start at element e * G * N, its channel scales at e * N,
// exactly the dense layout of each expert, concatenated.
#include <cuda_bf16.h>

#include "fp8_scales.cuh"
#include "kernels.h"

namespace w4a8_fastprep {

// Upstream rounding reproduced (see reference.quantize_scale_rows):
// kNativePath: scale = amax * fp32(1/448), values multiplied by 1/scale
//              (vLLM's QuantFP8.forward_native on CUDA, eager or compiled);
// kCudaPath:   scale = amax / 448, values divided by the scale (vLLM's CUDA
//              kernel, used with enforce_eager).

constexpr int kScaleRows = 32;
constexpr int kScaleThreads = 256;

__device__ __forceinline__ float nan_max(float a, float b) {
  // torch.max propagates NaN.
  return (a != a || a > b) ? a : b;
}

template <int kPath>
__global__ void __launch_bounds__(kScaleThreads)
    prepare_scales_kernel(const __nv_bfloat16* __restrict__ in,
                          uint64_t* __restrict__ packed,
                          float* __restrict__ chan, int64_t n_rows,
                          int64_t groups) {
  __shared__ float row_factor[kScaleRows];  // 1/scale (native) or scale
  // global row (over all experts), the expert, and the row inside it
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kScaleRows;
  const int64_t expert = row0 / n_rows;
  const int64_t n0 = row0 - expert * n_rows;
  in += row0 * groups;
  chan += row0;
  packed += expert * groups * n_rows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr int kWarps = kScaleThreads / 32;

  for (int r = warp; r < kScaleRows; r += kWarps) {
    const __nv_bfloat16* row = in + r * groups;
    float amax = 0.0f;
    for (int64_t g = lane; g < groups; g += 32) {
      amax = nan_max(amax, fabsf(__bfloat162float(row[g])));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    }
    if (lane == 0) {
      float s = (kPath == kNativePath) ? __fmul_rn(amax, kInv448)
                                   : __fdiv_rn(amax, kFp8Max);
      s = nan_max(s, kFp8MinScalingFactor);
      // Inductor's 1/s is div.full.f32, eager's is correctly rounded: equal
      // for every s reachable from a bf16 amax (checked exhaustively).
      row_factor[r] = (kPath == kNativePath) ? __frcp_rn(s) : s;
      chan[r] = __fmul_rn(s, 8.0f);
    }
  }
  __syncthreads();

  const int64_t work = static_cast<int64_t>(kScaleRows) * groups;
  for (int64_t i = threadIdx.x; i < work; i += kScaleThreads) {
    const int r = static_cast<int>(i % kScaleRows);
    const int64_t g = i / kScaleRows;
    const float x = __bfloat162float(in[r * groups + g]);
    const float q = (kPath == kCudaPath) ? __fdiv_rn(x, row_factor[r])
                                     : __fmul_rn(x, row_factor[r]);
    // fp8 group scale, then "/ 8" re-rounded to fp8 (exact division by 8).
    const uint8_t q8 = to_e4m3(from_e4m3(to_e4m3(q)) * 0.125f);
    packed[g * n_rows + n0 + r] = pack8(q8);
  }
}

cudaError_t launch_prepare_scales(int path, const void* weight_scale,
                                  void* packed, void* chan, int64_t n_rows,
                                  int64_t groups, int64_t num_experts,
                                  cudaStream_t stream) {
  const unsigned blocks =
      static_cast<unsigned>(num_experts * n_rows / kScaleRows);
  const auto* in = static_cast<const __nv_bfloat16*>(weight_scale);
  auto* out = static_cast<uint64_t*>(packed);
  auto* ch = static_cast<float*>(chan);
  if (path == kNativePath) {
    prepare_scales_kernel<kNativePath><<<blocks, kScaleThreads, 0, stream>>>(
        in, out, ch, n_rows, groups);
  } else {
    prepare_scales_kernel<kCudaPath><<<blocks, kScaleThreads, 0, stream>>>(
        in, out, ch, n_rows, groups);
  }
  return cudaGetLastError();
}

}  // namespace w4a8_fastprep
