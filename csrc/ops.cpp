// Tensor-level ops: argument checks (clear errors), output allocation, device
// guard, PyTorch's current stream, launch status. Stable ABI only.
#include "ops.h"

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>

#include "kernels.h"

namespace w4a8_fastprep {
namespace {

using torch::headeronly::ScalarType;

// Every error of this file goes through fail(): our own check instead of
// STD_TORCH_CHECK / TORCH_ERROR_CODE_CHECK. On an H100 machine with PyPI torch
// 2.11 (Ubuntu 24.04, GCC 13.3) a failing STD_TORCH_CHECK inside an
// extension op segfaulted the process, even when caught in the same function
// (a minimal extension reproduced it; a plain throw, and std::ostringstream in
// a plain library, work there). Both torch macros build their message with a
// string stream; messages built with std::string do not crash. The shim
// calls below (allocation, stream, device guard) are checked the same way.
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
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

std::string device_name(int32_t device_index) {
  return "cuda:" + std::to_string(device_index);
}

// Makes `device_index` the current CUDA device for the scope (the shim's
// device guard, with our error path).
class DeviceGuard {
 public:
  DeviceGuard(int32_t device_index, const char* op) {
    const AOTITorchError err =
        aoti_torch_create_device_guard(device_index, &guard_);
    W4A8_CHECK(err == AOTI_TORCH_SUCCESS, op, "could not make ",
               device_name(device_index),
               " the current device (PyTorch shim error code ", err, ")");
  }
  ~DeviceGuard() {
    if (guard_ != nullptr) aoti_torch_delete_device_guard(guard_);  // no throw
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  DeviceGuardHandle guard_ = nullptr;
};

// PyTorch's current CUDA stream of the device (never the legacy default).
cudaStream_t current_stream(int32_t device_index, const char* op) {
  void* stream = nullptr;
  const AOTITorchError err =
      aoti_torch_get_current_cuda_stream(device_index, &stream);
  W4A8_CHECK(err == AOTI_TORCH_SUCCESS, op,
             "could not get PyTorch's current CUDA stream of ",
             device_name(device_index), " (PyTorch shim error code ", err, ")");
  return static_cast<cudaStream_t>(stream);
}

// A new CUDA tensor in one shim call (cheaper than the dispatcher's new_empty
// + transpose: this runs once per layer, and small layers are latency-bound).
// The shim reports a failed allocation only as an error code (PyTorch logs its
// own message); we ask the driver how much memory is free to say why.
Tensor empty_cuda(std::initializer_list<int64_t> sizes,
                  std::initializer_list<int64_t> strides, int32_t dtype,
                  int64_t element_bytes, int32_t device_index, const char* op,
                  const char* what) {
  AtenTensorHandle handle = nullptr;
  const AOTITorchError err = aoti_torch_empty_strided(
      static_cast<int64_t>(sizes.size()), sizes.begin(), strides.begin(), dtype,
      aoti_torch_device_type_cuda(), device_index, &handle);
  if (err == AOTI_TORCH_SUCCESS && handle != nullptr) return Tensor(handle);

  int64_t bytes = element_bytes;
  for (int64_t s : sizes) bytes *= s;
  size_t free_bytes = 0, total_bytes = 0;
  const cudaError_t info = cudaMemGetInfo(&free_bytes, &total_bytes);
  if (info != cudaSuccess) {
    cudaGetLastError();  // do not leave our query's error to a later launch
    fail(op, "could not allocate ", what, " (", bytes, " bytes) on ",
         device_name(device_index),
         " (PyTorch's allocator failed, shim error code ", err,
         "; the CUDA context reports: ", cudaGetErrorString(info), ")");
  }
  fail(op, "out of memory: could not allocate ", what, " (", bytes,
       " bytes) on ", device_name(device_index), ", which has ",
       static_cast<int64_t>(free_bytes), " bytes free of ",
       static_cast<int64_t>(total_bytes),
       " (PyTorch's allocator failed, shim error code ", err, ")");
}

void check_launch(cudaError_t err, const char* op) {
  W4A8_CHECK(err == cudaSuccess, op,
             "CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_input(const Tensor& t, const char* op, const char* name,
                 ScalarType dtype, const char* dtype_name, int64_t dim,
                 const char* layout) {
  W4A8_CHECK(t.is_cuda(), op, name, " must be a CUDA tensor");
  W4A8_CHECK(t.scalar_type() == dtype, op, name, " must be ", dtype_name);
  W4A8_CHECK(t.dim() == dim, op, name, " must be ", dim, "-D ", layout,
             ", got ", t.dim(), "-D");
  W4A8_CHECK(t.numel() > 0, op, name, " is empty");
}

// The weight kernel reads its input 16 bytes at a time from the data pointer
// on: a view with a storage offset (e.g. b[1:].view(...)) would fault with a
// misaligned address and take the CUDA context down. Outputs are our own
// allocations (aligned).
void check_aligned(const Tensor& t, const char* op, const char* name) {
  const auto address = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const int64_t off = static_cast<int64_t>(address % kInputAlignment);
  W4A8_CHECK(off == 0, op, name, " must start at a ", kInputAlignment,
             "-byte aligned address (the kernel reads ", kInputAlignment,
             " bytes at a time); its data pointer is ", off,
             " bytes past one (a view with a storage offset?). Pass ", name,
             ".clone(), or call vllm_w4a8_fastprep.ops, which copies such "
             "input");
}

void check_multiples(int64_t n_rows, int64_t k, const char* op) {
  W4A8_CHECK(n_rows % kShapeMultiple == 0, op,
             "N (output features) must be a multiple of ", kShapeMultiple,
             ", got ", n_rows);
  W4A8_CHECK(k % kShapeMultiple == 0, op,
             "K (input features) must be a multiple of ", kShapeMultiple,
             ", got ", k);
  // grid.x of the weight kernel, per expert
  W4A8_CHECK(n_rows / 64 * (k / 256 + 1) < (int64_t{1} << 31), op,
             "tensor too large for one launch (N=", n_rows, ", K=", k, ")");
}

void check_experts(int64_t num_experts, const char* op) {
  W4A8_CHECK(num_experts <= kMaxExperts, op, "at most ", kMaxExperts,
             " experts per call, got ", num_experts);
}

// num_experts int4 [N][K] buffers -> the CUTLASS layout of each, into a new
// int32 tensor of the given sizes/strides (the same memory as the input).
Tensor encode_reorder(const Tensor& in, std::initializer_list<int64_t> sizes,
                      std::initializer_list<int64_t> strides, int64_t n_rows,
                      int64_t k, int64_t num_experts, bool from_uint4b8,
                      const char* op) {
  const int32_t device = in.get_device_index();
  const DeviceGuard guard(device, op);
  Tensor out = empty_cuda(sizes, strides, aoti_torch_dtype_int32(), 4, device,
                          op, "the prepared weight");
  check_launch(launch_encode_reorder(from_uint4b8, in.const_data_ptr(),
                                     out.mutable_data_ptr(), n_rows, k,
                                     num_experts, current_stream(device, op)),
               op);
  return out;
}

std::tuple<Tensor, Tensor> scales(const Tensor& weight_scale, int64_t path,
                                  int64_t num_experts, int64_t n_rows,
                                  int64_t groups, bool grouped,
                                  const char* op) {
  W4A8_CHECK(n_rows % kShapeMultiple == 0, op,
             "N (output features) must be a multiple of ", kShapeMultiple,
             ", got ", n_rows);
  W4A8_CHECK(path == kNativePath || path == kCudaPath, op,
             "unknown scale path ", path, " (", int64_t{kNativePath},
             ": native, ", int64_t{kCudaPath}, ": cuda)");
  W4A8_CHECK(num_experts * n_rows / 32 < (int64_t{1} << 31), op,
             "tensor too large for one launch (", num_experts * n_rows,
             " rows)");
  const int32_t device = weight_scale.get_device_index();
  const DeviceGuard guard(device, op);
  Tensor packed = empty_cuda({kScalePackBytes * num_experts * groups * n_rows},
                             {1}, aoti_torch_dtype_float8_e4m3fn(), 1, device,
                             op, "the packed scales");
  Tensor chan = grouped ? empty_cuda({num_experts, n_rows, 1}, {n_rows, 1, 1},
                                     aoti_torch_dtype_float32(), 4, device, op,
                                     "the channel scales")
                        : empty_cuda({n_rows, 1}, {1, 1},
                                     aoti_torch_dtype_float32(), 4, device, op,
                                     "the channel scales");
  check_launch(launch_prepare_scales(static_cast<int>(path),
                                     weight_scale.const_data_ptr(),
                                     packed.mutable_data_ptr(),
                                     chan.mutable_data_ptr(), n_rows, groups,
                                     num_experts, current_stream(device, op)),
               op);
  return {packed, chan};
}

}  // namespace

// ------------------------------------------------------------------ dense

Tensor prepare_weight(Tensor weight_packed) {
  constexpr const char* op = "prepare_weight";
  check_input(weight_packed, op, "weight_packed", ScalarType::Int, "int32", 2,
              "[N, K/8]");
  W4A8_CHECK(weight_packed.is_contiguous(), op,
             "weight_packed must be a contiguous (row-major) [N, K/8] tensor, "
             "got strides (",
             weight_packed.stride(0), ", ", weight_packed.stride(1), ")");
  const int64_t n_rows = weight_packed.size(0);
  const int64_t k = weight_packed.size(1) * kInt4PerInt32;
  check_multiples(n_rows, k, op);
  check_aligned(weight_packed, op, "weight_packed");
  // int32 (K/8, N) with strides (1, K/8): the memory of an [N, K/8] buffer
  return encode_reorder(weight_packed, {k / 8, n_rows}, {1, k / 8}, n_rows, k,
                        1, /*from_uint4b8=*/true, op);
}

Tensor encode_and_reorder_int4b(Tensor b) {
  constexpr const char* op = "encode_and_reorder_int4b";
  check_input(b, op, "B", ScalarType::Int, "int32", 2, "(K/8, N)");
  const int64_t k = b.size(0) * kInt4PerInt32;
  const int64_t n_rows = b.size(1);
  W4A8_CHECK(b.stride(0) == 1 && b.stride(1) == b.size(0), op,
             "B must be int32 (K/8, N) with strides (1, K/8) (the memory of an "
             "int4 [N][K] row-major buffer), got strides (",
             b.stride(0), ", ", b.stride(1), ")");
  check_multiples(n_rows, k, op);
  check_aligned(b, op, "B");
  return encode_reorder(b, {k / 8, n_rows}, {1, k / 8}, n_rows, k, 1,
                        /*from_uint4b8=*/false, op);
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
  const DeviceGuard guard(device, op);
  Tensor out = empty_cuda({kScalePackBytes * n}, {1},
                          aoti_torch_dtype_float8_e4m3fn(), 1, device, op,
                          "the packed scales");
  check_launch(launch_pack_scale_fp8(scales.const_data_ptr(),
                                     out.mutable_data_ptr(), n,
                                     current_stream(device, op)),
               op);
  return out;
}

std::tuple<Tensor, Tensor> prepare_scales(Tensor weight_scale, int64_t path) {
  constexpr const char* op = "prepare_scales";
  check_input(weight_scale, op, "weight_scale", ScalarType::BFloat16,
              "bfloat16", 2, "[N, K/128]");
  W4A8_CHECK(weight_scale.is_contiguous(), op,
             "weight_scale must be a contiguous [N, K/128] tensor");
  return scales(weight_scale, path, 1, weight_scale.size(0),
                weight_scale.size(1), /*grouped=*/false, op);
}

// ---------------------------------------------------------------- grouped

Tensor prepare_weight_grouped(Tensor weight_packed) {
  constexpr const char* op = "prepare_weight_grouped";
  check_input(weight_packed, op, "weight_packed", ScalarType::Int, "int32", 3,
              "(E, N, K/8)");
  W4A8_CHECK(weight_packed.is_contiguous(), op,
             "weight_packed must be a contiguous (E, N, K/8) tensor, got "
             "strides (",
             weight_packed.stride(0), ", ", weight_packed.stride(1), ", ",
             weight_packed.stride(2), ")");
  const int64_t experts = weight_packed.size(0);
  const int64_t n_rows = weight_packed.size(1);
  const int64_t k = weight_packed.size(2) * kInt4PerInt32;
  check_experts(experts, op);
  check_multiples(n_rows, k, op);
  check_aligned(weight_packed, op, "weight_packed");
  return encode_reorder(weight_packed, {experts, n_rows, k / 8},
                        {n_rows * (k / 8), k / 8, 1}, n_rows, k, experts,
                        /*from_uint4b8=*/true, op);
}

Tensor encode_and_reorder_int4b_grouped(Tensor b) {
  constexpr const char* op = "encode_and_reorder_int4b_grouped";
  check_input(b, op, "B", ScalarType::Int, "int32", 3, "(E, N, K/8)");
  W4A8_CHECK(b.is_contiguous(), op,
             "B must be a contiguous (E, N, K/8) tensor, got strides (",
             b.stride(0), ", ", b.stride(1), ", ", b.stride(2), ")");
  const int64_t experts = b.size(0);
  const int64_t n_rows = b.size(1);
  const int64_t k = b.size(2) * kInt4PerInt32;
  check_experts(experts, op);
  check_multiples(n_rows, k, op);
  check_aligned(b, op, "B");
  return encode_reorder(b, {experts, n_rows, k / 8},
                        {n_rows * (k / 8), k / 8, 1}, n_rows, k, experts,
                        /*from_uint4b8=*/false, op);
}

std::tuple<Tensor, Tensor> prepare_scales_grouped(Tensor weight_scale,
                                                  int64_t path) {
  constexpr const char* op = "prepare_scales_grouped";
  check_input(weight_scale, op, "weight_scale", ScalarType::BFloat16,
              "bfloat16", 3, "(E, N, K/128)");
  W4A8_CHECK(weight_scale.is_contiguous(), op,
             "weight_scale must be a contiguous (E, N, K/128) tensor");
  return scales(weight_scale, path, weight_scale.size(0),
                weight_scale.size(1), weight_scale.size(2), /*grouped=*/true,
                op);
}

// -------------------------------------------------------------- constants

int64_t constant(std::string name) {
  if (name == "group_size") return kGroupSize;
  if (name == "shape_multiple") return kShapeMultiple;
  if (name == "int4_per_int32") return kInt4PerInt32;
  if (name == "scale_pack_bytes") return kScalePackBytes;
  if (name == "input_alignment") return kInputAlignment;
  if (name == "max_experts") return kMaxExperts;
  if (name == "scale_path.native") return kNativePath;
  if (name == "scale_path.cuda") return kCudaPath;
  fail("constant", "unknown constant '", name, "'");
}

}  // namespace w4a8_fastprep
