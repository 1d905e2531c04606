// prepare_weight: checkpoint uint4b8 int32 [N, K/8] -> CUTLASS int32 (K/8, N)
// with strides (1, K/8), in one pass (uint4b8 -> int4, encode, reorder).
#include <torch/csrc/stable/ops.h>

#include "encode_reorder_launch.cuh"

namespace w4a8_fastprep {

Tensor prepare_weight(Tensor weight_packed) {
  constexpr const char* op = "prepare_weight";
  check_cuda_2d(weight_packed, op, "weight_packed", ScalarType::Int, "int32");
  STD_TORCH_CHECK(weight_packed.is_contiguous(), "w4a8_fastprep::", op,
                  ": weight_packed must be a contiguous (row-major) [N, K/8] "
                  "tensor, got strides (",
                  weight_packed.stride(0), ", ", weight_packed.stride(1), ")");
  const int64_t n_rows = weight_packed.size(0);
  const int64_t k = weight_packed.size(1) * 8;
  Tensor out = torch::stable::new_empty(weight_packed, {n_rows, k / 8});
  launch_encode_reorder<true>(weight_packed, out, n_rows, k, op);
  return torch::stable::transpose(out, 0, 1);
}

}  // namespace w4a8_fastprep
