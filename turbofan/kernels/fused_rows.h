// The per-row loops of fused_ops.cpp, included once per ISA inside a `#pragma GCC target(...)` region and its
// own namespace (and once for the baseline), so the compiler vectorises them for that ISA. Plain float code:
// the exp below is written so it vectorises too (no libm call in the loop).

// exp(x) to ~2 ulp: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for e^r, 2^n by the exponent bits.
static inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

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

static void rms_norm_rows(const float* x, const float* w, float* y, int64_t r0, int64_t r1, int64_t n, float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const float inv = row_inv_rms(x + r * n, n, eps);
    for (int64_t j = 0; j < n; ++j) y[r * n + j] = (x[r * n + j] * inv) * w[j];
  }
}

static void add_rms_norm_rows(const float* x, const float* res, const float* w, float* s, float* y, int64_t r0,
                              int64_t r1, int64_t n, float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t j = 0; j < n; ++j) s[r * n + j] = x[r * n + j] + res[r * n + j];
    const float inv = row_inv_rms(s + r * n, n, eps);
    for (int64_t j = 0; j < n; ++j) y[r * n + j] = (s[r * n + j] * inv) * w[j];
  }
}

static void rope_rows(const float* x, int64_t row_stride, const float* c, const float* sn, float* y, int64_t r0,
                      int64_t r1, int64_t h, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const float *cr = c + r * half, *sr = sn + r * half;
    for (int64_t hh = 0; hh < h; ++hh) {
      const float* xr = x + r * row_stride + hh * d;
      float* yr = y + (r * h + hh) * d;
      for (int64_t j = 0; j < half; ++j) {
        const float x1 = xr[j], x2 = xr[j + half];
        yr[j] = x1 * cr[j] - x2 * sr[j];
        yr[j + half] = x2 * cr[j] + x1 * sr[j];
      }
    }
  }
}

static void gated_rows(const float* gu, float* y, int64_t r0, int64_t r1, int64_t i, bool gelu) {
  for (int64_t r = r0; r < r1; ++r) {
    const float *g = gu + r * 2 * i, *u = g + i;
    float* o = y + r * i;
    if (gelu) {  // 0.5 v (1 + tanh(a)) = v * sigmoid(2a), a = sqrt(2 / pi) (v + 0.044715 v^3)
      for (int64_t j = 0; j < i; ++j) {
        const float v = g[j];
        const float a = 0.7978845608028654f * (v + 0.044715f * v * v * v);
        o[j] = v / (1.f + fast_exp(-2.f * a)) * u[j];
      }
    } else {
      for (int64_t j = 0; j < i; ++j) o[j] = g[j] / (1.f + fast_exp(-g[j])) * u[j];
    }
  }
}
