// Small fused ops of a decoder layer. Each replaces several eager PyTorch ops (and their dispatch, which at
// batch 1 costs more than the arithmetic): RMSNorm, residual add + RMSNorm, rotary embedding, SiLU/GELU(tanh)
// gating. Rows are independent and each row is computed the same way whatever the batch, so outputs stay
// batch-invariant. The row loops (fused_rows.h) are compiled per ISA and picked at run time like the matmul's.
namespace turbofan::fused {

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "fused_rows.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
namespace avx512 {
#include "fused_rows.h"
}  // namespace avx512
#pragma GCC pop_options

namespace scalar {
#include "fused_rows.h"
}  // namespace scalar

// The row loops of the ISA level in force (turbofan::g_isa).
#define TF_FUSED(fn) (g_isa == kAvx512 ? avx512::fn : g_isa == kAvx2 ? avx2::fn : scalar::fn)

static void check_rows(const at::Tensor& x, const at::Tensor& w, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, op, ": float32 only");
  TORCH_CHECK(w.dim() == 1 && x.size(-1) == w.size(0), op, ": weight must match the last dimension");
}

// y = x / rms(x) * w over the last dimension.
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  check_rows(x_in, w_in, "rms_norm");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto fn = TF_FUSED(rms_norm_rows);
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) { fn(xp, wp, yp, r0, r1, n, static_cast<float>(eps)); });
  return y;
}

// s = x + residual; returns (s, rms_norm(s) * w): the residual stream and the next sub-layer's input.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, const at::Tensor& r_in, const at::Tensor& w_in,
                                                double eps) {
  check_rows(x_in, w_in, "add_rms_norm");
  TORCH_CHECK(x_in.sizes() == r_in.sizes(), "add_rms_norm: x and residual differ in shape");
  const at::Tensor x = x_in.contiguous(), res = r_in.contiguous(), w = w_in.contiguous();
  at::Tensor s = at::empty_like(x), y = at::empty_like(x);
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  const float *xp = x.data_ptr<float>(), *rp = res.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *sp = s.data_ptr<float>(), *yp = y.data_ptr<float>();
  auto fn = TF_FUSED(add_rms_norm_rows);
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) { fn(xp, rp, wp, sp, yp, r0, r1, n, static_cast<float>(eps)); });
  return {s, y};
}

// Rotary embedding, HF convention (halves): x [T, H, D] (rows may be strided, heads contiguous), cos/sin [T, D/2].
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat, "rope: x must be float32 [T, H, D]");
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2), "rope: heads must be contiguous within a row");
  const int64_t t = x.size(0), h = x.size(1), d = x.size(2), half = d / 2;
  const at::Tensor c = cos_in.reshape({t, half}).contiguous(), s = sin_in.reshape({t, half}).contiguous();
  at::Tensor y = at::empty({t, h, d}, x.options());
  const float *xp = x.data_ptr<float>(), *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t stride = x.stride(0);
  auto fn = TF_FUSED(rope_rows);
  at::parallel_for(0, t, 16, [&](int64_t r0, int64_t r1) { fn(xp, stride, cp, sp, yp, r0, r1, h, d); });
  return y;
}

// gate_up [T, 2I] -> act(gate) * up [T, I]; act is SiLU, or GELU with the tanh approximation when gelu is set.
at::Tensor gated_act(const at::Tensor& gu_in, bool gelu) {
  TORCH_CHECK(gu_in.dim() == 2 && gu_in.scalar_type() == at::kFloat && gu_in.size(1) % 2 == 0,
              "gated_act: gate_up must be float32 [T, 2I]");
  const at::Tensor gu = gu_in.contiguous();
  const int64_t t = gu.size(0), i = gu.size(1) / 2;
  at::Tensor y = at::empty({t, i}, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto fn = TF_FUSED(gated_rows);
  at::parallel_for(0, t, 16, [&](int64_t r0, int64_t r1) { fn(gp, yp, r0, r1, i, gelu); });
  return y;
}

#undef TF_FUSED

}  // namespace turbofan::fused

TORCH_LIBRARY_FRAGMENT(turbofan, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("gated_act(Tensor gate_up, bool gelu) -> Tensor");
}
TORCH_LIBRARY_IMPL(turbofan, CPU, m) {
  m.impl("rms_norm", &turbofan::fused::rms_norm);
  m.impl("add_rms_norm", &turbofan::fused::add_rms_norm);
  m.impl("rope", &turbofan::fused::rope);
  m.impl("gated_act", &turbofan::fused::gated_act);
}
