// Schemas and registrations of the w4a8_fastprep ops (stable ABI).
// Fake (meta) implementations and the CPU path live in Python (ops.py).
#include <Python.h>

#include <torch/csrc/stable/library.h>

#include "ops.h"

STABLE_TORCH_LIBRARY(w4a8_fastprep, m) {
  // dense: one Linear layer
  m.def("prepare_weight(Tensor weight_packed) -> Tensor");
  m.def("encode_and_reorder_int4b(Tensor b) -> Tensor");
  m.def("pack_scale_fp8(Tensor scales) -> Tensor");
  m.def("prepare_scales(Tensor weight_scale, int path) -> (Tensor, Tensor)");
  // grouped: all experts of a MoE layer, (E, N, ...) tensors
  m.def("prepare_weight_grouped(Tensor weight_packed) -> Tensor");
  m.def("encode_and_reorder_int4b_grouped(Tensor b) -> Tensor");
  m.def(
      "prepare_scales_grouped(Tensor weight_scale, int path) -> (Tensor, "
      "Tensor)");
  // the constants shared with Python (kernels.h), by name
  m.def("constant(str name) -> int");
}

STABLE_TORCH_LIBRARY_IMPL(w4a8_fastprep, CUDA, m) {
  m.impl("prepare_weight", TORCH_BOX(&w4a8_fastprep::prepare_weight));
  m.impl("encode_and_reorder_int4b",
         TORCH_BOX(&w4a8_fastprep::encode_and_reorder_int4b));
  m.impl("pack_scale_fp8", TORCH_BOX(&w4a8_fastprep::pack_scale_fp8));
  m.impl("prepare_scales", TORCH_BOX(&w4a8_fastprep::prepare_scales));
  m.impl("prepare_weight_grouped",
         TORCH_BOX(&w4a8_fastprep::prepare_weight_grouped));
  m.impl("encode_and_reorder_int4b_grouped",
         TORCH_BOX(&w4a8_fastprep::encode_and_reorder_int4b_grouped));
  m.impl("prepare_scales_grouped",
         TORCH_BOX(&w4a8_fastprep::prepare_scales_grouped));
}

// No tensor argument: one kernel for every backend (works on CPU-only
// machines too, so the contract test runs in CI).
STABLE_TORCH_LIBRARY_IMPL(w4a8_fastprep, CompositeExplicitAutograd, m) {
  m.impl("constant", TORCH_BOX(&w4a8_fastprep::constant));
}

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr,
                                        -1, nullptr};

extern "C" PyObject* PyInit__C(void) { return PyModule_Create(&module_def); }
