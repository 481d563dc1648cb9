// The operator schemas of fne_fast, declared once. Kernels register per device in cpu/ and cuda/.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import fne_fast._C` loads this library, which runs the static registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fne_fast, m) {
  m.def(
      "sample_negatives(Tensor anchors, Tensor bank, Tensor positive_sim, Tensor anchor_ids, Tensor bank_ids, "
      "Tensor stats, Tensor? fn_thresholds, Tensor? anchor_guides, Tensor? bank_guides, int k, str mode, "
      "float margin, float tau, float fn_tau, float prior_k, float fn_margin, int min_count, bool cutdown, "
      "float center_offset, float? relative_cut, float? guide_threshold, int seed, int step, int row_offset, "
      "int col_offset, int filled, bool check_finite, bool count_above) "
      "-> (Tensor index, Tensor sim, Tensor valid, Tensor key, Tensor above)");
  // Whether a CPU call with bf16 anchors and bank would take oneDNN's bf16 kernel now (the CPU has avx512_bf16
  // and torch.backends.mkldnn is enabled); tests and benchmarks ask it which path they measure.
  m.def("cpu_bf16_brgemm() -> bool");
  // The same for oneDNN's float32 kernel (AVX-512 and torch.backends.mkldnn enabled), which every other call takes.
  m.def("cpu_float32_brgemm() -> bool");
  // Which loops the CPU kernel's epilogue runs in this process: "avx512", or "portable" (a CPU without AVX-512F,
  // or FNE_FAST_CPU_PORTABLE set); tests ask it whether the variable took effect.
  m.def("cpu_epilogue() -> str");
}
