// pack_scale_fp8: drop-in for vLLM's cutlass_pack_scale_fp8, on the GPU.
// fp8 e4m3 scales (contiguous, e.g. (K/128, N)) -> 1-D fp8 of 8x the elements:
// out[8*i + j] = fp8(s_i * (j - 8)), j = 0..7 (RNE, saturating; NaN -> 0x7F).
#include <torch/csrc/stable/ops.h>

#include "common.cuh"
#include "fp8_scales.cuh"

namespace w4a8_fastprep {

__global__ void pack_scale_fp8_kernel(const uint8_t* __restrict__ in,
                                      uint64_t* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < n; i += stride) {
    out[i] = pack8(in[i]);
  }
}

Tensor pack_scale_fp8(Tensor scales) {
  constexpr const char* op = "pack_scale_fp8";
  STD_TORCH_CHECK(scales.is_cuda(), "w4a8_fastprep::", op,
                  ": scales must be a CUDA tensor");
  STD_TORCH_CHECK(scales.scalar_type() == ScalarType::Float8_e4m3fn,
                  "w4a8_fastprep::", op, ": scales must be float8_e4m3fn");
  STD_TORCH_CHECK(scales.numel() > 0, "w4a8_fastprep::", op,
                  ": scales is empty");
  STD_TORCH_CHECK(scales.is_contiguous(), "w4a8_fastprep::", op,
                  ": scales must be contiguous");
  const int64_t n = scales.numel();
  Tensor out = torch::stable::new_empty(scales, {8 * n});
  const int32_t device = scales.get_device_index();
  const torch::stable::accelerator::DeviceGuard guard(device);
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 1 << 20);
  pack_scale_fp8_kernel<<<static_cast<unsigned>(blocks), threads, 0,
                          current_stream(device)>>>(
      static_cast<const uint8_t*>(scales.const_data_ptr()),
      static_cast<uint64_t*>(out.mutable_data_ptr()), n);
  check_launch(op);
  return out;
}

}  // namespace w4a8_fastprep
