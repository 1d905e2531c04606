// Host side of the fused encode + reorder pass, shared by prepare_weight and
// encode_and_reorder_int4b (they differ only in the input nibble format).
#pragma once

#include "common.cuh"
#include "encode_reorder_kernel.cuh"

namespace w4a8_fastprep {

template <bool kFromUint4b8>
void launch_encode_reorder(const Tensor& in, const Tensor& out, int64_t n_rows,
                           int64_t k, const char* op) {
  STD_TORCH_CHECK(n_rows % 128 == 0, "w4a8_fastprep::", op,
                  ": N (output features) must be a multiple of 128, got ",
                  n_rows);
  STD_TORCH_CHECK(k % 128 == 0, "w4a8_fastprep::", op,
                  ": K (input features) must be a multiple of 128, got ", k);
  STD_TORCH_CHECK(n_rows / kWeightRows * (k / 128) <= 0x7fffffffLL,
                  "w4a8_fastprep::", op, ": tensor too large");
  const int32_t device = in.get_device_index();
  const torch::stable::accelerator::DeviceGuard guard(device);
  const cudaError_t err = launch_encode_reorder_raw<kFromUint4b8>(
      static_cast<const uint8_t*>(in.const_data_ptr()),
      static_cast<uint8_t*>(out.mutable_data_ptr()), n_rows, k,
      current_stream(device));
  STD_TORCH_CHECK(err == cudaSuccess, "w4a8_fastprep::", op,
                  ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace w4a8_fastprep
