// Shared by every turbofan kernel source (the sources are compiled as one translation unit, this one first).
// The ISA level is decided in Python (turbofan/kernels/__init__.py: detected, capped by TURBOFAN_ISA or
// ATEN_CPU_CAPABILITY) and set here once; each kernel dispatches on it per call. Nothing is chosen at build time.
#include <torch/custom_class.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace turbofan {

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
static int64_t g_isa = kScalar;

int64_t set_isa(int64_t level) {
  TORCH_CHECK(level >= kScalar && level <= kAvx512, "isa level must be 0 (scalar), 1 (avx2) or 2 (avx512)");
  int64_t old = g_isa;
  g_isa = level;
  return old;
}

int64_t get_isa() { return g_isa; }

}  // namespace turbofan

TORCH_LIBRARY_FRAGMENT(turbofan, m) {
  m.def("set_isa(int level) -> int", &turbofan::set_isa);
  m.def("get_isa() -> int", &turbofan::get_isa);
}
