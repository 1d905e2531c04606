// encode_and_reorder_int4b: drop-in for vLLM's cutlass_encode_and_reorder_int4b.
// Input: signed int4 as int32 (K/8, N) with strides (1, K/8), i.e. the memory
// of an int4 [N][K] row-major buffer. Output: same shape and strides.
#include <torch/csrc/stable/ops.h>

#include "encode_reorder_launch.cuh"

namespace w4a8_fastprep {

Tensor encode_and_reorder_int4b(Tensor b) {
  constexpr const char* op = "encode_and_reorder_int4b";
  check_cuda_2d(b, op, "B", ScalarType::Int, "int32");
  const int64_t k = b.size(0) * 8;
  const int64_t n_rows = b.size(1);
  STD_TORCH_CHECK(b.stride(0) == 1 && b.stride(1) == b.size(0),
                  "w4a8_fastprep::", op,
                  ": B must be int32 (K/8, N) with strides (1, K/8) (the "
                  "memory of an int4 [N][K] row-major buffer), got strides (",
                  b.stride(0), ", ", b.stride(1), ")");
  Tensor out = torch::stable::new_empty(b, {n_rows, k / 8});
  launch_encode_reorder<false>(b, out, n_rows, k, op);
  return torch::stable::transpose(out, 0, 1);
}

}  // namespace w4a8_fastprep
