// fp8 e4m3 helpers of the scale ops. No fast-math anywhere: every rounding
// step is spelled out so that it matches the upstream code path bit for bit.
#pragma once

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace w4a8_fastprep {

constexpr float kFp8Max = 448.0f;
// vLLM: 1.0 / (448 * 512) in double precision, used as an fp32 clamp bound.
constexpr float kFp8MinScalingFactor = static_cast<float>(1.0 / (448.0 * 512.0));
// On CUDA, PyTorch (eager division by a scalar) and Inductor (division by a
// constant) both compute "x / 448" as "x * (1/448)", 1/448 rounded to fp32.
constexpr float kInv448 = static_cast<float>(1.0 / 448.0);

// fp32 -> e4m3, round to nearest even, saturating to +-448 (NaN -> 0x7F).
__device__ __forceinline__ uint8_t to_e4m3(float x) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float from_e4m3(uint8_t b) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(b, __NV_E4M3);
  return __half2float(__half(h));
}

// The 8 packed bytes of one fp8 group scale: byte j = fp8(s * (j - 8)).
// s * (j - 8) is exact in fp32 (4 significant bits times a 4-bit integer).
__device__ __forceinline__ uint64_t pack8(uint8_t s_byte) {
  const float s = from_e4m3(s_byte);
  uint64_t packed = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    packed |= static_cast<uint64_t>(to_e4m3(s * static_cast<float>(j - 8)))
              << (8 * j);
  }
  return packed;
}

}  // namespace w4a8_fastprep
