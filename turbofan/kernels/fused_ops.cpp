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

// The attention inputs from a fused q/k/v projection in one call: split qkv [T, (H + 2 KVH) D] into heads, apply
// the optional per-head q/k RMSNorm (Qwen3, Gemma 3), rotate q and k. Returns contiguous q [T, H, D], k and v
// [T, KVH, D]. Replaces a split, three reshapes, two norms and two rotations per layer.
std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_rope(const at::Tensor& qkv_in, const at::Tensor& cos_in,
                                                       const at::Tensor& sin_in, int64_t heads, int64_t kv_heads,
                                                       const c10::optional<at::Tensor>& q_norm,
                                                       const c10::optional<at::Tensor>& k_norm, double eps) {
  TORCH_CHECK(qkv_in.dim() == 2 && qkv_in.scalar_type() == at::kFloat, "qkv_rope: qkv must be float32 [T, N]");
  const at::Tensor qkv = qkv_in.contiguous();
  const int64_t t = qkv.size(0), d = qkv.size(1) / (heads + 2 * kv_heads), half = d / 2;
  TORCH_CHECK(d * (heads + 2 * kv_heads) == qkv.size(1) && d % 2 == 0, "qkv_rope: width does not split into heads");
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "qkv_rope: pass both q and k norms or neither");
  const at::Tensor c = cos_in.reshape({t, half}).contiguous(), s = sin_in.reshape({t, half}).contiguous();
  at::Tensor q = at::empty({t, heads, d}, qkv.options()), k = at::empty({t, kv_heads, d}, qkv.options());
  at::Tensor v = qkv.narrow(1, (heads + kv_heads) * d, kv_heads * d).reshape({t, kv_heads, d}).clone();
  const float *xp = qkv.data_ptr<float>(), *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
  const int64_t stride = qkv.size(1);
  float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>();
  auto rope_fn = TF_FUSED(rope_rows);
  if (!q_norm.has_value()) {
    at::parallel_for(0, t, 16, [&](int64_t r0, int64_t r1) {
      rope_fn(xp, stride, cp, sp, qp, r0, r1, heads, d);
      rope_fn(xp + heads * d, stride, cp, sp, kp, r0, r1, kv_heads, d);
    });
    return {q, k, v};
  }
  TORCH_CHECK(q_norm->numel() == d && k_norm->numel() == d, "qkv_rope: q/k norms must have head_dim weights");
  const at::Tensor qn = q_norm->to(at::kFloat).contiguous(), kn = k_norm->to(at::kFloat).contiguous();
  auto norm_fn = TF_FUSED(rms_norm_rows);
  at::parallel_for(0, t, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf((heads + kv_heads) * d);
    for (int64_t r = r0; r < r1; ++r) {  // normalise each head into buf, then rotate from there
      const float* row = xp + r * stride;
      norm_fn(row, qn.data_ptr<float>(), buf.data(), 0, heads, d, static_cast<float>(eps));
      norm_fn(row + heads * d, kn.data_ptr<float>(), buf.data() + heads * d, 0, kv_heads, d, static_cast<float>(eps));
      rope_fn(buf.data(), 0, cp + r * half, sp + r * half, qp + r * heads * d, 0, 1, heads, d);
      rope_fn(buf.data() + heads * d, 0, cp + r * half, sp + r * half, kp + r * kv_heads * d, 0, 1, kv_heads, d);
    }
  });
  return {q, k, v};
}

#undef TF_FUSED

// The first j with row[j] == b (b a NaN: the first NaN), scanning in chunks whose test vectorises.
static int64_t first_index_of(const float* row, int64_t n, float b) {
  constexpr int64_t kChunk = 64;
  const bool nan = std::isnan(b);
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t len = std::min(n - j0, kChunk);
    const float* p = row + j0;
    int hit = 0;
    if (nan) {
      for (int64_t j = 0; j < len; ++j) hit |= p[j] != p[j];
    } else {
      for (int64_t j = 0; j < len; ++j) hit |= p[j] == b;
    }
    if (!hit) continue;
    for (int64_t j = 0; j < len; ++j)
      if (nan ? p[j] != p[j] : p[j] == b) return j0 + j;
  }
  return 0;
}

// The index of each row's largest value: the first one on ties, a NaN counting as the largest (torch.argmax's
// rule), so greedy decoding picks exactly what argmax picks. A vectorised max (at::amax), then a scan in chunks
// for its first occurrence: torch's argmax carries an index through every comparison and took 2.5-9 ms for 64
// rows of a 49k vocabulary here, against ~0.3 ms for this.
at::Tensor argmax_rows(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.size(1) > 0,
              "argmax_rows: x must be float32 [rows, n > 0]");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  if (rows == 0) return out;
  const at::Tensor best = at::amax(x, {1});
  const float *xp = x.data_ptr<float>(), *bp = best.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) op[r] = first_index_of(xp + r * n, n, bp[r]);
  });
  return out;
}

}  // namespace turbofan::fused

TORCH_LIBRARY_FRAGMENT(turbofan, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("gated_act(Tensor gate_up, bool gelu) -> Tensor");
  m.def("qkv_rope(Tensor qkv, Tensor cos, Tensor sin, int heads, int kv_heads, Tensor? q_norm, Tensor? k_norm, "
        "float eps) -> (Tensor, Tensor, Tensor)");
  m.def("argmax_rows(Tensor x) -> Tensor");
}
TORCH_LIBRARY_IMPL(turbofan, CPU, m) {
  m.impl("rms_norm", &turbofan::fused::rms_norm);
  m.impl("add_rms_norm", &turbofan::fused::add_rms_norm);
  m.impl("rope", &turbofan::fused::rope);
  m.impl("gated_act", &turbofan::fused::gated_act);
  m.impl("qkv_rope", &turbofan::fused::qkv_rope);
  m.impl("argmax_rows", &turbofan::fused::argmax_rows);
}
