// The CUDA implementations of the w4a8_fastprep ops (see torch_bindings.cpp).
#pragma once

#include <tuple>

#include <torch/csrc/stable/tensor.h>

namespace w4a8_fastprep {

using torch::stable::Tensor;

Tensor prepare_weight(Tensor weight_packed);
Tensor encode_and_reorder_int4b(Tensor b);
Tensor pack_scale_fp8(Tensor scales);
std::tuple<Tensor, Tensor> prepare_scales(Tensor weight_scale, int64_t path);

}  // namespace w4a8_fastprep
