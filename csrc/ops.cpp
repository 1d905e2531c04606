// Tensor-level ops: argument checks (clear errors), output allocation, device
// guard, PyTorch's current stream, launch status. Stable ABI only.
#include "ops.h"

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include "kernels.h"

namespace w4a8_fastprep {
namespace {

using torch::headeronly::ScalarType;

// Our own check instead of STD_TORCH_CHECK: on the lent H100 machine (Ubuntu
// 24.04, GCC 13.3, PyPI torch 2.11) a failing STD_TORCH_CHECK inside an
// extension op segfaulted the process, even when caught in the same function
// (a minimal extension reproduced it; a plain throw, and std::ostringstream in
// a plain library, work there). Messages built with std::string do not crash.
inline void append(std::string& s, const char* v) { s += v; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}

template <typename... Args>
[[noreturn]] void fail(const char* op, const Args&... args) {
  std::string msg = "w4a8_fastprep::";
  msg += op;
  msg += ": ";
  (append(msg, args), ...);
  throw std::runtime_error(msg);
}

#define W4A8_CHECK(cond, op, ...)        \
  do {                                   \
    if (!(cond)) fail(op, __VA_ARGS__);  \
  } while (0)

// PyTorch's current CUDA stream of the device (never the legacy default).
cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(
      aoti_torch_get_current_cuda_stream(device_index, &stream));
  return static_cast<cudaStream_t>(stream);
}

// A new CUDA tensor in one shim call (cheaper than the dispatcher's new_empty
// + transpose: this runs once per layer, and small layers are latency-bound).
Tensor empty_cuda(std::initializer_list<int64_t> sizes,
                  std::initializer_list<int64_t> strides, int32_t dtype,
                  int32_t device_index) {
  AtenTensorHandle handle = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(
      static_cast<int64_t>(sizes.size()), sizes.begin(), strides.begin(), dtype,
      aoti_torch_device_type_cuda(), device_index, &handle));
  return Tensor(handle);
}

void check_launch(cudaError_t err, const char* op) {
  W4A8_CHECK(err == cudaSuccess, op,
             "CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_2d(const Tensor& t, const char* op, const char* name,
              ScalarType dtype, const char* dtype_name) {
  W4A8_CHECK(t.is_cuda(), op, name, " must be a CUDA tensor");
  W4A8_CHECK(t.scalar_type() == dtype, op, name, " must be ", dtype_name);
  W4A8_CHECK(t.dim() == 2, op, name, " must be 2-D, got ", t.dim(), "-D");
  W4A8_CHECK(t.numel() > 0, op, name, " is empty");
}

void check_multiples(int64_t n_rows, int64_t k, const char* op) {
  W4A8_CHECK(n_rows % 128 == 0, op,
             "N (output features) must be a multiple of 128, got ", n_rows);
  W4A8_CHECK(k % 128 == 0, op,
             "K (input features) must be a multiple of 128, got ", k);
  W4A8_CHECK(n_rows / 64 * (k / 256 + 1) < (int64_t{1} << 31), op,
             "tensor too large for one launch (N=", n_rows, ", K=", k, ")");
}

// int32 (K/8, N) with strides (1, K/8): the memory of an [N, K/8] buffer
Tensor encode_reorder(const Tensor& in, int64_t n_rows, int64_t k,
                      bool from_uint4b8, const char* op) {
  const int32_t device = in.get_device_index();
  Tensor out = empty_cuda({k / 8, n_rows}, {1, k / 8}, aoti_torch_dtype_int32(),
                          device);
  const torch::stable::accelerator::DeviceGuard guard(device);
  check_launch(launch_encode_reorder(from_uint4b8, in.const_data_ptr(),
                                     out.mutable_data_ptr(), n_rows, k,
                                     current_stream(device)),
               op);
  return out;
}

}  // namespace

Tensor prepare_weight(Tensor weight_packed) {
  constexpr const char* op = "prepare_weight";
  check_2d(weight_packed, op, "weight_packed", ScalarType::Int, "int32");
  W4A8_CHECK(weight_packed.is_contiguous(), op,
             "weight_packed must be a contiguous (row-major) [N, K/8] tensor, "
             "got strides (",
             weight_packed.stride(0), ", ", weight_packed.stride(1), ")");
  const int64_t n_rows = weight_packed.size(0);
  const int64_t k = weight_packed.size(1) * 8;
  check_multiples(n_rows, k, op);
  return encode_reorder(weight_packed, n_rows, k, /*from_uint4b8=*/true, op);
}

Tensor encode_and_reorder_int4b(Tensor b) {
  constexpr const char* op = "encode_and_reorder_int4b";
  check_2d(b, op, "B", ScalarType::Int, "int32");
  const int64_t k = b.size(0) * 8;
  const int64_t n_rows = b.size(1);
  W4A8_CHECK(b.stride(0) == 1 && b.stride(1) == b.size(0), op,
             "B must be int32 (K/8, N) with strides (1, K/8) (the memory of an "
             "int4 [N][K] row-major buffer), got strides (",
             b.stride(0), ", ", b.stride(1), ")");
  check_multiples(n_rows, k, op);
  return encode_reorder(b, n_rows, k, /*from_uint4b8=*/false, op);
}

Tensor pack_scale_fp8(Tensor scales) {
  constexpr const char* op = "pack_scale_fp8";
  W4A8_CHECK(scales.is_cuda(), op, "scales must be a CUDA tensor");
  W4A8_CHECK(scales.scalar_type() == ScalarType::Float8_e4m3fn, op,
             "scales must be float8_e4m3fn");
  W4A8_CHECK(scales.numel() > 0, op, "scales is empty");
  W4A8_CHECK(scales.is_contiguous(), op, "scales must be contiguous");
  const int64_t n = scales.numel();
  const int32_t device = scales.get_device_index();
  Tensor out = empty_cuda({8 * n}, {1}, aoti_torch_dtype_float8_e4m3fn(), device);
  const torch::stable::accelerator::DeviceGuard guard(device);
  check_launch(launch_pack_scale_fp8(scales.const_data_ptr(),
                                     out.mutable_data_ptr(), n,
                                     current_stream(device)),
               op);
  return out;
}

std::tuple<Tensor, Tensor> prepare_scales(Tensor weight_scale, int64_t path) {
  constexpr const char* op = "prepare_scales";
  check_2d(weight_scale, op, "weight_scale", ScalarType::BFloat16, "bfloat16");
  W4A8_CHECK(weight_scale.is_contiguous(), op,
             "weight_scale must be a contiguous [N, K/128] tensor");
  const int64_t n_rows = weight_scale.size(0);
  const int64_t groups = weight_scale.size(1);
  W4A8_CHECK(n_rows % 128 == 0, op,
             "N (output features) must be a multiple of 128, got ", n_rows);
  W4A8_CHECK(path == kNativePath || path == kCudaPath, op,
             "unknown scale path ", path, " (0: native, 1: cuda)");
  const int32_t device = weight_scale.get_device_index();
  Tensor packed = empty_cuda({8 * n_rows * groups}, {1},
                             aoti_torch_dtype_float8_e4m3fn(), device);
  Tensor chan = empty_cuda({n_rows, 1}, {1, 1}, aoti_torch_dtype_float32(), device);
  const torch::stable::accelerator::DeviceGuard guard(device);
  check_launch(launch_prepare_scales(static_cast<int>(path),
                                     weight_scale.const_data_ptr(),
                                     packed.mutable_data_ptr(),
                                     chan.mutable_data_ptr(), n_rows, groups,
                                     current_stream(device)),
               op);
  return {packed, chan};
}

}  // namespace w4a8_fastprep
