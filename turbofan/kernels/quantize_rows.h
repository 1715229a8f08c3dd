// Included by quant_matmul.cpp once per ISA region and once for the scalar path (compiled per target, so the
// compiler vectorises it as far as that target allows; the results are the same bytes everywhere).

// Per-row int8 quantization of activations in blocks of 32 (scale d = amax / 127), plus d * sum(q) per block for
// the 4-bit format's min term and the raw sum for the 8-bit VNNI correction. Elementwise and exact.
static void quantize_rows(const float* x, int64_t rows, int64_t k, int8_t* q, float* d, float* s) {
  const int64_t nb = k / kBlock;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + r * k + b * kBlock;
      int8_t* qb = q + r * k + b * kBlock;
      float amax = 0.f;
      for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float scale = amax / 127.f;
      const float inv = scale != 0.f ? 1.f / scale : 0.f;
      int32_t sum = 0;
      for (int j = 0; j < kBlock; ++j) {
        const int8_t v = static_cast<int8_t>(std::nearbyint(xb[j] * inv));
        qb[j] = v;
        sum += v;
      }
      d[r * nb + b] = scale;
      s[r * nb + b] = scale * static_cast<float>(sum);
    }
  }
}
