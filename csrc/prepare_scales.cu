// prepare_scales: checkpoint bf16 group scales [N, G] (G = K/128) ->
//   packed fp8 1-D [8 * G * N] (what cutlass_w4a8_mm takes) and
//   fp32 channel scales [N, 1],
// in one pass, equal to vLLM's convert_bf16_scales_to_fp8 (dynamic per-row
// fp8 quantisation, /8 and x8) + transpose + cutlass_pack_scale_fp8.
//
// A block owns 32 rows: its warps find each row's absolute maximum (coalesced
// over the row), then all threads walk (g, n) with n fastest, so that every
// warp writes 32 x 8 = 256 contiguous output bytes.
#include <torch/csrc/stable/ops.h>

#include "common.cuh"
#include "fp8_scales.cuh"

namespace w4a8_fastprep {

// Which upstream rounding is reproduced (see reference.quantize_scale_rows).
enum ScalePath : int { kCompiled = 0, kNative = 1, kCuda = 2 };

constexpr int kScaleRows = 32;
constexpr int kScaleThreads = 256;

__device__ __forceinline__ float div_full(float a, float b) {
  // Triton lowers an fp32 "/" to div.full.f32; Inductor's 1/scale is that.
  float r;
  asm("div.full.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

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
  __shared__ float row_scale[kScaleRows];
  __shared__ float row_factor[kScaleRows];  // inverse (or the scale itself)
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kScaleRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr int kWarps = kScaleThreads / 32;

  for (int r = warp; r < kScaleRows; r += kWarps) {
    const __nv_bfloat16* row = in + (n0 + r) * groups;
    float amax = 0.0f;
    for (int64_t g = lane; g < groups; g += 32) {
      amax = nan_max(amax, fabsf(__bfloat162float(row[g])));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    }
    if (lane == 0) {
      float s = (kPath == kCompiled) ? __fmul_rn(amax, kInv448)
                                     : __fdiv_rn(amax, kFp8Max);
      s = nan_max(s, kFp8MinScalingFactor);
      row_scale[r] = s;
      row_factor[r] = (kPath == kCompiled) ? div_full(1.0f, s)
                      : (kPath == kNative) ? __frcp_rn(s)
                                           : s;
      chan[n0 + r] = __fmul_rn(s, 8.0f);
    }
  }
  __syncthreads();

  const int64_t work = static_cast<int64_t>(kScaleRows) * groups;
  for (int64_t i = threadIdx.x; i < work; i += kScaleThreads) {
    const int r = static_cast<int>(i % kScaleRows);
    const int64_t g = i / kScaleRows;
    const float x = __bfloat162float(in[(n0 + r) * groups + g]);
    const float q = (kPath == kCuda) ? __fdiv_rn(x, row_factor[r])
                                     : __fmul_rn(x, row_factor[r]);
    // fp8 group scale, then "/ 8" re-rounded to fp8 (exact division by 8).
    const uint8_t q8 = to_e4m3(from_e4m3(to_e4m3(q)) * 0.125f);
    packed[g * n_rows + n0 + r] = pack8(q8);
  }
}

void prepare_scales_out(Tensor weight_scale, int64_t path, Tensor packed,
                        Tensor chan) {
  constexpr const char* op = "prepare_scales";
  check_cuda_2d(weight_scale, op, "weight_scale", ScalarType::BFloat16,
                "bfloat16");
  STD_TORCH_CHECK(weight_scale.is_contiguous(), "w4a8_fastprep::", op,
                  ": weight_scale must be a contiguous [N, K/128] tensor");
  const int64_t n_rows = weight_scale.size(0);
  const int64_t groups = weight_scale.size(1);
  STD_TORCH_CHECK(n_rows % 128 == 0, "w4a8_fastprep::", op,
                  ": N (output features) must be a multiple of 128, got ",
                  n_rows);
  STD_TORCH_CHECK(path >= kCompiled && path <= kCuda, "w4a8_fastprep::", op,
                  ": unknown scale path ", path);
  const int32_t device = weight_scale.get_device_index();
  const torch::stable::accelerator::DeviceGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  const unsigned blocks = static_cast<unsigned>(n_rows / kScaleRows);
  const auto* in = static_cast<const __nv_bfloat16*>(weight_scale.const_data_ptr());
  auto* out = static_cast<uint64_t*>(packed.mutable_data_ptr());
  auto* ch = static_cast<float*>(chan.mutable_data_ptr());
  if (path == kCompiled) {
    prepare_scales_kernel<kCompiled><<<blocks, kScaleThreads, 0, stream>>>(
        in, out, ch, n_rows, groups);
  } else if (path == kNative) {
    prepare_scales_kernel<kNative><<<blocks, kScaleThreads, 0, stream>>>(
        in, out, ch, n_rows, groups);
  } else {
    prepare_scales_kernel<kCuda><<<blocks, kScaleThreads, 0, stream>>>(
        in, out, ch, n_rows, groups);
  }
  check_launch(op);
}

std::tuple<Tensor, Tensor> prepare_scales(Tensor weight_scale, int64_t path) {
  check_cuda_2d(weight_scale, "prepare_scales", "weight_scale",
                ScalarType::BFloat16, "bfloat16");
  const int64_t n_rows = weight_scale.size(0);
  const int64_t groups = weight_scale.size(1);
  Tensor packed = torch::stable::new_empty(weight_scale, {8 * n_rows * groups},
                                           ScalarType::Float8_e4m3fn);
  Tensor chan =
      torch::stable::new_empty(weight_scale, {n_rows, 1}, ScalarType::Float);
  prepare_scales_out(weight_scale, path, packed, chan);
  return {packed, chan};
}

}  // namespace w4a8_fastprep
