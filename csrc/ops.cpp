// Schemas of the mmgrad_C operator library (CPU kernels in csrc/cpu/) and the Python module stub
// that lets `import mmgrad._C` load this shared object, which registers the ops as a side effect.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mmgrad_C, m) {
  m.def("gram(Tensor J) -> Tensor");
  m.def("combine(Tensor J, Tensor w) -> Tensor");
  m.def("combine_out(Tensor J, Tensor w, Tensor(a!) out) -> ()");
  m.def("segment_moments(Tensor x, Tensor offsets, Tensor numels) -> Tensor");
  m.def("segment_gram(Tensor J, Tensor offsets, Tensor numels) -> Tensor");
  m.def(
      "segment_combine_(Tensor(a!) out, Tensor J, Tensor offsets, Tensor numels, Tensor weights) -> ()");
  m.def(
      "segment_scale_(Tensor(a!) x, Tensor offsets, Tensor numels, Tensor scale, "
      "Tensor? noise_std=None, Tensor? seed=None) -> ()");
  m.def(
      "segment_lerp_(Tensor(a!) x, Tensor y, Tensor offsets, Tensor numels, Tensor weight) -> ()");
  m.def(
      "feature_drop(Tensor z, int[] widths, Tensor drop_prob, Tensor seed, Tensor counter) -> "
      "(Tensor, Tensor)");
  m.def(
      "philox_uniform(Tensor seed, Tensor counter, int n, Tensor? index, ScalarType dtype, "
      "bool packed=False) -> Tensor");
  m.def("trace_normalized(Tensor G, float eps, float reg) -> Tensor");
  m.def("pcgrad_coefficients(Tensor G, Tensor order) -> Tensor");
  m.def(
      "gradvac_coefficients(Tensor G, Tensor order, Tensor phi_t, float beta, float eps) -> "
      "(Tensor, Tensor)");
  m.def("nash_newton(Tensor G, Tensor alpha0, int iters) -> Tensor");
  m.def(
      "project_dual_cone(Tensor G, Tensor U, int iters, float ridge, float tol, int backup) -> "
      "Tensor");
  m.def("min_norm_simplex(Tensor G, int iters, float ridge, float tol) -> Tensor");
  m.def(
      "cagrad_dual(Tensor G, Tensor b, Tensor s, int iters, float ridge, float tol, int backup, "
      "float kappa_max) -> Tensor");
  m.def("graddrop(Tensor J, Tensor seed, Tensor counter, Tensor? leak, Tensor? index) -> Tensor");
}

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "mmgrad C++ ops (torch.ops.mmgrad_C)",
                            -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
