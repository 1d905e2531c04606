// Schemas and CUDA registrations of the w4a8_fastprep ops (stable ABI).
// Fake (meta) implementations and the CPU path live in Python (ops.py).
#include <Python.h>

#include <torch/csrc/stable/library.h>

#include "ops.h"

STABLE_TORCH_LIBRARY(w4a8_fastprep, m) {
  m.def("prepare_weight(Tensor weight_packed) -> Tensor");
  m.def("encode_and_reorder_int4b(Tensor b) -> Tensor");
  m.def("pack_scale_fp8(Tensor scales) -> Tensor");
  m.def("prepare_scales(Tensor weight_scale, int path) -> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(w4a8_fastprep, CUDA, m) {
  m.impl("prepare_weight", TORCH_BOX(&w4a8_fastprep::prepare_weight));
  m.impl("encode_and_reorder_int4b",
         TORCH_BOX(&w4a8_fastprep::encode_and_reorder_int4b));
  m.impl("pack_scale_fp8", TORCH_BOX(&w4a8_fastprep::pack_scale_fp8));
  m.impl("prepare_scales", TORCH_BOX(&w4a8_fastprep::prepare_scales));
}

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr,
                                        -1, nullptr};

extern "C" PyObject* PyInit__C(void) { return PyModule_Create(&module_def); }
