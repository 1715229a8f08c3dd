// The block-quantized matmul's inner loops, included once per ISA by quant_matmul.cpp inside a
// `#pragma GCC target(...)` region and its own namespace. Before including, the includer defines:
//   kLanes                        int32/float lanes of a vector (8 for AVX2, 16 for AVX-512)
//   VI, VF                        the integer and float vector types
//   TF_MM(name), TF_SI(name)      the intrinsic `name` at this width (_mm512_##name, _mm512_##name##_si512 or
//                                 the _mm256 ones): the vi_* / vf_* helpers below are written once with them
//   vf_load_half(p)               kLanes float16 values, converted to float
//   dot_q4(acc, w, x4)            acc += 4-byte dots of unsigned 4-bit codes w and the broadcast int8 quad x4
//   dot_q8(acc, w, x4)            the same for signed 8-bit codes (VNNI: returns the dot + 128 * sum(w))
//   kQ8Bias                       1 when dot_q8 adds 128 * sum(w) (the wsum correction applies), else 0
// and includes quantize_rows.h.
// Lanes are output channels: each output's block dot is an exact int32, then one float FMA per block, in block
// order. That order does not depend on the vector width, the row tile or the batch, so every path (AVX2,
// AVX-512, scalar) gives bit-identical results and a row's output never depends on its batch mates.

static inline VI vi_zero() { return TF_SI(setzero)(); }
static inline VI vi_load(const uint8_t* p) { return TF_SI(loadu)(reinterpret_cast<const VI*>(p)); }  // kLanes*4 bytes
static inline VI vi_and(VI a, VI b) { return TF_SI(and)(a, b); }
static inline VI vi_set1_8(char v) { return TF_MM(set1_epi8)(v); }
static inline VI vi_srli16(VI a, int s) { return TF_MM(srli_epi16)(a, s); }
static inline VI vi_slli32(VI a, int s) { return TF_MM(slli_epi32)(a, s); }
static inline VI vi_sub32(VI a, VI b) { return TF_MM(sub_epi32)(a, b); }
static inline VI load_quad(const int8_t* p) { return TF_MM(set1_epi32)(quad_bits(p)); }  // 4 int8 in every lane
static inline VF vi_to_f(VI a) { return TF_MM(cvtepi32_ps)(a); }
static inline VF vf_zero() { return TF_MM(setzero_ps)(); }
static inline VF vf_set1(float v) { return TF_MM(set1_ps)(v); }
static inline VF vf_mul(VF a, VF b) { return TF_MM(mul_ps)(a, b); }
static inline VF vf_fmadd(VF a, VF b, VF c) { return TF_MM(fmadd_ps)(a, b, c); }
static inline void vf_store(float* p, VF v) { TF_MM(storeu_ps)(p, v); }

// How far ahead of the block being multiplied its weights are prefetched: at batch 1 a decode step streams every
// weight from DRAM once, and the dots between loads leave the hardware prefetcher short of the stream (measured on
// Zen 4, 30 layers of SmolLM2's projections: 2,048 bytes ahead 5-13% faster than none, 1 or 2 threads; further
// ahead no better).
constexpr int64_t kPrefetchBytes = 2048;

// MR activation rows against kLanes output channels (one lane group of a 16-row panel), over all K blocks.
template <int MR, bool Q4>
static inline void panel_tile(const uint8_t* w, const at::Half* wd, const at::Half* wm, const int32_t* wsum,
                              int64_t nb, int half, const int8_t* xq, const float* xd, const float* xs, int64_t k,
                              float* out, int64_t ldo) {
  constexpr int kGroups = Q4 ? 4 : 8;              // 64-byte groups per block and panel
  constexpr int64_t kBlockBytes = kGroups * 64;    // one block of a 16-row panel
  VF acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = vf_zero();
  for (int64_t b = 0; b < nb; ++b) {
    VI dots[MR];
    for (int r = 0; r < MR; ++r) dots[r] = vi_zero();
    const uint8_t* wb = w + b * kBlockBytes + half * kLanes * 4;
    for (int g = 0; g < kGroups; ++g) _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetchBytes + g * 64), _MM_HINT_T0);
    if ((b & 1) == 0) {  // the block scales (and mins): 32 bytes a block, one line every second block
      const int64_t ahead = (b + kPrefetchBytes / kBlockBytes) * 16;
      _mm_prefetch(reinterpret_cast<const char*>(wd + ahead), _MM_HINT_T0);
      if constexpr (Q4) _mm_prefetch(reinterpret_cast<const char*>(wm + ahead), _MM_HINT_T0);
    }
    for (int g = 0; g < kGroups; ++g) {
      const VI raw = vi_load(wb + g * 64);
      if constexpr (Q4) {
        const VI lo = vi_and(raw, vi_set1_8(0x0F)), hi = vi_and(vi_srli16(raw, 4), vi_set1_8(0x0F));
        for (int r = 0; r < MR; ++r) {
          const int8_t* xb = xq + r * k + b * kBlock;
          dots[r] = dot_q4(dots[r], lo, load_quad(xb + 4 * g));
          dots[r] = dot_q4(dots[r], hi, load_quad(xb + 4 * (g + 4)));
        }
      } else {
        for (int r = 0; r < MR; ++r) dots[r] = dot_q8(dots[r], raw, load_quad(xq + r * k + b * kBlock + 4 * g));
      }
    }
    const int64_t sb = b * 16 + half * kLanes;  // this lane group's scales for block b
    const VF dw = vf_load_half(wd + sb);
    if constexpr (Q4) {
      const VF mw = vf_load_half(wm + sb);
      for (int r = 0; r < MR; ++r) {
        acc[r] = vf_fmadd(vi_to_f(dots[r]), vf_mul(dw, vf_set1(xd[r * nb + b])), acc[r]);
        acc[r] = vf_fmadd(mw, vf_set1(xs[r * nb + b]), acc[r]);
      }
    } else {
      const VI bias = kQ8Bias ? vi_slli32(vi_load(reinterpret_cast<const uint8_t*>(wsum + sb)), 7) : vi_zero();
      for (int r = 0; r < MR; ++r)
        acc[r] = vf_fmadd(vi_to_f(vi_sub32(dots[r], bias)), vf_mul(dw, vf_set1(xd[r * nb + b])), acc[r]);
    }
  }
  for (int r = 0; r < MR; ++r) vf_store(out + r * ldo, acc[r]);
}

// out[m, 16p + i] for the panels p in [p0, p1), every row m.
template <bool Q4>
static void matmul_panels(const uint8_t* w, const at::Half* wd, const at::Half* wm, const int32_t* wsum, int64_t p0,
                          int64_t p1, int64_t k, const int8_t* xq, const float* xd, const float* xs, int64_t m,
                          float* out, int64_t n) {
  const int64_t nb = k / kBlock;
  const int64_t panel_bytes = nb * (Q4 ? 4 : 8) * 64;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* wp = w + p * panel_bytes;
    const at::Half* dp = wd + p * nb * 16;
    const at::Half* mp = Q4 ? wm + p * nb * 16 : nullptr;
    const int32_t* sp = Q4 ? nullptr : wsum + p * nb * 16;
    for (int half = 0; half < 16 / kLanes; ++half) {
      float* o = out + p * 16 + half * kLanes;
      int64_t i = 0;
      for (; i + kRows <= m; i += kRows)
        panel_tile<kRows, Q4>(wp, dp, mp, sp, nb, half, xq + i * k, xd + i * nb, xs + i * nb, k, o + i * n, n);
      // The rest in as few passes over the panel as possible (each pass unpacks the weights again).
      if (kRows > 4 && i + 4 <= m) {
        panel_tile<4, Q4>(wp, dp, mp, sp, nb, half, xq + i * k, xd + i * nb, xs + i * nb, k, o + i * n, n);
        i += 4;
      }
      if (i + 2 <= m) {
        panel_tile<2, Q4>(wp, dp, mp, sp, nb, half, xq + i * k, xd + i * nb, xs + i * nb, k, o + i * n, n);
        i += 2;
      }
      if (i < m)
        panel_tile<1, Q4>(wp, dp, mp, sp, nb, half, xq + i * k, xd + i * nb, xs + i * nb, k, o + i * n, n);
    }
  }
}

// -- The K formats: GGUF's Q4_K and Q6_K kept as they are stored (turbofan/kernels/quant.py, "q4k" / "q6k") --------
// q4k: q4's codes; per block of 32 a 6-bit scale and min (uint8), per 256 a float16 d and dmin: w = (d*sc)*q - dmin*m.
// q6k: 6-bit codes (q4's nibble planes + a 2-bit plane), per 16 an int8 scale, per 256 a float16 d:
//      w = (d*sc)*(q - 32). Both products are formed in float32 as ggml forms them, so the weights are the file's.
// (the includer also defines vf_from_u8(p) / vf_from_i8(p): kLanes uint8 / int8 values, converted to float)
static inline VI vi_or(VI a, VI b) { return TF_SI(or)(a, b); }
static inline VI vi_slli16(VI a, int s) { return TF_MM(slli_epi16)(a, s); }

template <int MR, bool Q6>
static inline void panel_tile_k(const uint8_t* w, const void* wsc, const uint8_t* wm, const at::Half* sup, int64_t nb,
                                int half, const int8_t* xq, const float* xd, const float* xs, const int32_t* xh,
                                int64_t k, float* out, int64_t ldo) {
  constexpr int64_t kBlockBytes = Q6 ? 384 : 256;
  VF acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = vf_zero();
  for (int64_t b = 0; b < nb; ++b) {
    VI lo_dots[MR], hi_dots[MR];
    for (int r = 0; r < MR; ++r) lo_dots[r] = hi_dots[r] = vi_zero();
    const uint8_t* wb = w + b * kBlockBytes + half * kLanes * 4;
    for (int g = 0; g < (Q6 ? 6 : 4); ++g) _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetchBytes + g * 64), _MM_HINT_T0);
    VI h0 = vi_zero(), h1 = vi_zero();
    if constexpr (Q6) {
      h0 = vi_load(wb + 256);
      h1 = vi_load(wb + 320);
    }
    for (int g = 0; g < 4; ++g) {
      const VI raw = vi_load(wb + g * 64);
      VI lo = vi_and(raw, vi_set1_8(0x0F)), hi = vi_and(vi_srli16(raw, 4), vi_set1_8(0x0F));
      if constexpr (Q6) {  // the two high bits of quad g (plane 0) and quad g + 4 (plane 1)
        lo = vi_or(lo, vi_slli16(vi_and(vi_srli16(h0, 2 * g), vi_set1_8(0x03)), 4));
        hi = vi_or(hi, vi_slli16(vi_and(vi_srli16(h1, 2 * g), vi_set1_8(0x03)), 4));
      }
      for (int r = 0; r < MR; ++r) {
        const int8_t* xb = xq + r * k + b * kBlock;
        lo_dots[r] = dot_q4(lo_dots[r], lo, load_quad(xb + 4 * g));
        hi_dots[r] = dot_q4(hi_dots[r], hi, load_quad(xb + 4 * (g + 4)));
      }
    }
    if constexpr (Q6) {  // halves of 16: quads 0..3 (low nibbles) and 4..7 (high nibbles), a scale each
      const VF d = vf_load_half(sup + (b / 8) * 16 + half * kLanes);
      const int8_t* sc = static_cast<const int8_t*>(wsc) + b * 32 + half * kLanes;
      const VF ds0 = vf_mul(d, vf_from_i8(sc)), ds1 = vf_mul(d, vf_from_i8(sc + 16));
      for (int r = 0; r < MR; ++r) {
        const VF x = vf_set1(xd[r * nb + b]);
        const VF c0 = vi_to_f(vi_sub32(lo_dots[r], TF_MM(set1_epi32)(32 * xh[(r * nb + b) * 2])));
        const VF c1 = vi_to_f(vi_sub32(hi_dots[r], TF_MM(set1_epi32)(32 * xh[(r * nb + b) * 2 + 1])));
        acc[r] = vf_fmadd(c0, vf_mul(ds0, x), acc[r]);
        acc[r] = vf_fmadd(c1, vf_mul(ds1, x), acc[r]);
      }
    } else {
      const at::Half* s = sup + (b / 8) * 32 + half * kLanes;
      const int64_t sb = b * 16 + half * kLanes;
      const VF dw = vf_mul(vf_load_half(s), vf_from_u8(static_cast<const uint8_t*>(wsc) + sb));
      const VF mw = vf_mul(vf_load_half(s + 16), vf_from_u8(wm + sb));
      for (int r = 0; r < MR; ++r) {
        const VI dots = TF_MM(add_epi32)(lo_dots[r], hi_dots[r]);
        acc[r] = vf_fmadd(vi_to_f(dots), vf_mul(dw, vf_set1(xd[r * nb + b])), acc[r]);
        acc[r] = TF_MM(fnmadd_ps)(mw, vf_set1(xs[r * nb + b]), acc[r]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) vf_store(out + r * ldo, acc[r]);
}

template <bool Q6>
static void matmul_panels_k(const uint8_t* w, const void* wsc, const uint8_t* wm, const at::Half* sup, int64_t p0,
                            int64_t p1, int64_t k, const int8_t* xq, const float* xd, const float* xs,
                            const int32_t* xh, int64_t m, float* out, int64_t n) {
  const int64_t nb = k / kBlock;
  const int64_t panel_bytes = nb * (Q6 ? 384 : 256);
  const int64_t scale_bytes = nb * (Q6 ? 32 : 16);
  const int64_t sup_len = nb / 8 * (Q6 ? 16 : 32);
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* wp = w + p * panel_bytes;
    const void* sp = static_cast<const uint8_t*>(wsc) + p * scale_bytes;
    const uint8_t* mp = Q6 ? nullptr : wm + p * scale_bytes;
    const at::Half* up = sup + p * sup_len;
    for (int half = 0; half < 16 / kLanes; ++half) {
      float* o = out + p * 16 + half * kLanes;
      int64_t i = 0;
      for (; i + kRows <= m; i += kRows)
        panel_tile_k<kRows, Q6>(wp, sp, mp, up, nb, half, xq + i * k, xd + i * nb, xs + i * nb, xh + i * nb * 2, k,
                                o + i * n, n);
      if (kRows > 4 && i + 4 <= m) {
        panel_tile_k<4, Q6>(wp, sp, mp, up, nb, half, xq + i * k, xd + i * nb, xs + i * nb, xh + i * nb * 2, k,
                            o + i * n, n);
        i += 4;
      }
      if (i + 2 <= m) {
        panel_tile_k<2, Q6>(wp, sp, mp, up, nb, half, xq + i * k, xd + i * nb, xs + i * nb, xh + i * nb * 2, k,
                            o + i * n, n);
        i += 2;
      }
      if (i < m)
        panel_tile_k<1, Q6>(wp, sp, mp, up, nb, half, xq + i * k, xd + i * nb, xs + i * nb, xh + i * nb * 2, k,
                            o + i * n, n);
    }
  }
}
