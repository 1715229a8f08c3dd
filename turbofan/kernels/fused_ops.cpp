// Small fused ops of a decoder layer. Each replaces several eager PyTorch ops (and their dispatch, which at
// batch 1 costs more than the arithmetic): RMSNorm, residual add + RMSNorm, rotary embedding, SiLU/GELU(tanh)
// gating. Rows are independent and each row is computed the same way whatever the batch, so outputs stay
// batch-invariant. Plain loops: they are memory-light and the compiler vectorises them for the baseline ISA.
namespace turbofan::fused {

static inline float row_inv_rms(const float* x, int64_t n, float eps) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += x[j + l] * x[j + l];
  float tail = 0.f;
  for (; j < n; ++j) tail += x[j] * x[j];
  const float ss = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + tail;
  return 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
}

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
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float inv = row_inv_rms(xp + r * n, n, static_cast<float>(eps));
      for (int64_t j = 0; j < n; ++j) yp[r * n + j] = (xp[r * n + j] * inv) * wp[j];
    }
  });
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
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t j = 0; j < n; ++j) sp[r * n + j] = xp[r * n + j] + rp[r * n + j];
      const float inv = row_inv_rms(sp + r * n, n, static_cast<float>(eps));
      for (int64_t j = 0; j < n; ++j) yp[r * n + j] = (sp[r * n + j] * inv) * wp[j];
    }
  });
  return {s, y};
}

// Rotary embedding, HF convention (halves): x [T, H, D] (rows may be strided, heads contiguous), cos/sin [T, D/2].
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat, "rope: x must be float32 [T, H, D]");
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2), "rope: heads must be contiguous within a row");
  const int64_t t = x.size(0), h = x.size(1), d = x.size(2), half = d / 2;
  const at::Tensor c = cos_in.reshape({t, half}).contiguous(), s = sin_in.reshape({t, half}).contiguous();
  at::Tensor y = at::empty({t, h, d}, x.options());
  const float* xp = x.data_ptr<float>();
  const float *cp = c.data_ptr<float>(), *snp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t row_stride = x.stride(0);
  at::parallel_for(0, t, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *cr = cp + r * half, *sr = snp + r * half;
      for (int64_t hh = 0; hh < h; ++hh) {
        const float* xr = xp + r * row_stride + hh * d;
        float* yr = yp + (r * h + hh) * d;
        for (int64_t j = 0; j < half; ++j) {
          const float x1 = xr[j], x2 = xr[j + half];
          yr[j] = x1 * cr[j] - x2 * sr[j];
          yr[j + half] = x2 * cr[j] + x1 * sr[j];
        }
      }
    }
  });
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
  at::parallel_for(0, t, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *g = gp + r * 2 * i, *u = g + i;
      float* o = yp + r * i;
      if (gelu) {
        for (int64_t j = 0; j < i; ++j) {
          const float v = g[j];
          const float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
          o[j] = 0.5f * v * (1.f + std::tanh(inner)) * u[j];
        }
      } else {
        for (int64_t j = 0; j < i; ++j) o[j] = g[j] / (1.f + std::exp(-g[j])) * u[j];
      }
    }
  });
  return y;
}

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
