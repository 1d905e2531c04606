// Shared helpers of the w4a8_fastprep CUDA ops (PyTorch stable ABI only).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

namespace w4a8_fastprep {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// PyTorch's current CUDA stream of the given device (never the legacy
// default stream), so that our work orders with the caller's.
inline cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(
      aoti_torch_get_current_cuda_stream(device_index, &stream));
  return static_cast<cudaStream_t>(stream);
}

// Every launch is checked: a failed launch raises with the op's name.
inline void check_launch(const char* op) {
  cudaError_t err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, "w4a8_fastprep::", op,
                  ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

inline void check_cuda_2d(const Tensor& t, const char* op, const char* name,
                          ScalarType dtype, const char* dtype_name) {
  STD_TORCH_CHECK(t.is_cuda(), "w4a8_fastprep::", op, ": ", name,
                  " must be a CUDA tensor");
  STD_TORCH_CHECK(t.scalar_type() == dtype, "w4a8_fastprep::", op, ": ", name,
                  " must be ", dtype_name);
  STD_TORCH_CHECK(t.dim() == 2, "w4a8_fastprep::", op, ": ", name,
                  " must be 2-D, got ", t.dim(), "-D");
  STD_TORCH_CHECK(t.numel() > 0, "w4a8_fastprep::", op, ": ", name,
                  " is empty");
}

}  // namespace w4a8_fastprep
