// The fused encode + reorder pass behind prepare_weight (uint4b8 input),
// encode_and_reorder_int4b (signed int4 input) and their grouped (MoE)
// versions (num_experts matrices in one launch).
#include "encode_reorder_kernel.cuh"
#include "kernels.h"

namespace w4a8_fastprep {

cudaError_t launch_encode_reorder(bool from_uint4b8, const void* in, void* out,
                                  int64_t n_rows, int64_t k,
                                  int64_t num_experts, cudaStream_t stream) {
  const auto* src = static_cast<const uint8_t*>(in);
  auto* dst = static_cast<uint8_t*>(out);
  return from_uint4b8 ? launch_encode_reorder_raw<true>(src, dst, n_rows, k,
                                                        stream, num_experts)
                      : launch_encode_reorder_raw<false>(src, dst, n_rows, k,
                                                         stream, num_experts);
}

}  // namespace w4a8_fastprep
