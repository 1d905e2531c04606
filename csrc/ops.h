// The implementations of the w4a8_fastprep ops (see torch_bindings.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <tuple>

#include <torch/csrc/stable/tensor.h>

namespace w4a8_fastprep {

using torch::stable::Tensor;

// Dense (one Linear layer).
Tensor prepare_weight(Tensor weight_packed);
Tensor encode_and_reorder_int4b(Tensor b);
Tensor pack_scale_fp8(Tensor scales);
std::tuple<Tensor, Tensor> prepare_scales(Tensor weight_scale, int64_t path);

// Grouped (all experts of a MoE layer, one launch each).
Tensor prepare_weight_grouped(Tensor weight_packed);
Tensor encode_and_reorder_int4b_grouped(Tensor b);
std::tuple<Tensor, Tensor> prepare_scales_grouped(Tensor weight_scale,
                                                  int64_t path);

// A constant shared with Python (kernels.h), by name.
int64_t constant(std::string name);

}  // namespace w4a8_fastprep
