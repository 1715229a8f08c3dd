// Block-quantized linear layers: y = x @ W^T (+ bias) with W in blocks of 32 along K.
//   4-bit (asymmetric, like GGUF Q4_1 / Q4_K): w = d * q + m, q in 0..15; d, m float16 per block.
//   8-bit (symmetric, like GGUF Q8_0):         w = d * q, q in -127..127; d float16 per block.
// Weights are laid out in panels of 16 output rows (turbofan/kernels/quant.py packs them), so a vector's lanes
// are output channels and each 4-byte group of K is one broadcast activation quad. Activations are quantized to
// int8 per row in blocks of 32 (the scheme llama.cpp uses on x86), so a row's result never depends on the other
// rows of the batch. Dots run on vpmaddubsw (AVX2) or vpdpbusd (AVX-512 VNNI).
namespace turbofan::qmm {

constexpr int kBlock = 32;

static inline int32_t quad_bits(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define TF_MM(name) _mm256_##name          // the intrinsics both widths spell alike (see quant_matmul_tile.h)
#define TF_SI(name) _mm256_##name##_si256  // and those named by their integer width
constexpr int kLanes = 8, kRows = 4, kQ8Bias = 0;
using VI = __m256i;
using VF = __m256;
static inline VF vf_load_half(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
static inline VF vf_from_u8(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))); }
static inline VF vf_from_i8(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))); }
static inline VI dot_q4(VI acc, VI w, VI x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
static inline VI dot_q8(VI acc, VI w, VI x) {  // |w| times x with w's sign: unsigned x signed, no saturation at 127
  const VI p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
#include "quantize_rows.h"
#include "quant_matmul_tile.h"
#undef TF_SI
#undef TF_MM
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
namespace avx512 {
#define TF_MM(name) _mm512_##name
#define TF_SI(name) _mm512_##name##_si512
constexpr int kLanes = 16, kRows = 8, kQ8Bias = 1;
using VI = __m512i;
using VF = __m512;
static inline VF vf_load_half(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
static inline VF vf_from_u8(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))); }
static inline VF vf_from_i8(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))); }
static inline VI dot_q4(VI acc, VI w, VI x) { return _mm512_dpbusd_epi32(acc, w, x); }
static inline VI dot_q8(VI acc, VI w, VI x) {  // (x + 128) unsigned times signed w: the dot plus 128 * sum(w)
  return _mm512_dpbusd_epi32(acc, _mm512_xor_si512(x, _mm512_set1_epi8(static_cast<char>(0x80))), w);
}
#include "quantize_rows.h"
#include "quant_matmul_tile.h"
#undef TF_SI
#undef TF_MM
}  // namespace avx512
#pragma GCC pop_options

// The scalar path: the same block dots and float order as the vector paths (see quant_matmul_tile.h).
namespace scalar {
constexpr int kLanes = 16;
#include "quantize_rows.h"

template <bool Q4>
static void matmul_panels(const uint8_t* w, const at::Half* wd, const at::Half* wm, const int32_t*, int64_t p0,
                          int64_t p1, int64_t k, const int8_t* xq, const float* xd, const float* xs, int64_t m,
                          float* out, int64_t n) {
  const int64_t nb = k / kBlock;
  const int64_t block_bytes = (Q4 ? 4 : 8) * 64;
  for (int64_t p = p0; p < p1; ++p) {
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int64_t i = 0; i < m; ++i) {
        float acc = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* wb = w + (p * nb + b) * block_bytes;
          const int8_t* xb = xq + i * k + b * kBlock;
          int32_t dot = 0;
          for (int t = 0; t < 8; ++t) {  // quad t of the block
            for (int e = 0; e < 4; ++e) {
              int32_t code;
              if (Q4) {
                const uint8_t byte = wb[(t % 4) * 64 + lane * 4 + e];
                code = t < 4 ? (byte & 0x0F) : (byte >> 4);
              } else {
                code = static_cast<int8_t>(wb[t * 64 + lane * 4 + e]);
              }
              dot += code * xb[4 * t + e];
            }
          }
          const int64_t sb = (p * nb + b) * 16 + lane;
          acc = std::fma(static_cast<float>(dot), static_cast<float>(wd[sb]) * xd[i * nb + b], acc);
          if (Q4) acc = std::fma(static_cast<float>(wm[sb]), xs[i * nb + b], acc);
        }
        out[i * n + p * 16 + lane] = acc;
      }
    }
  }
}

// The K formats, in the vector paths' float order: per block, the int dot(s), then one FMA per scale.
template <bool Q6>
static void matmul_panels_k(const uint8_t* w, const void* wsc, const uint8_t* wm, const at::Half* sup, int64_t p0,
                            int64_t p1, int64_t k, const int8_t* xq, const float* xd, const float* xs,
                            const int32_t* xh, int64_t m, float* out, int64_t n) {
  const int64_t nb = k / kBlock;
  const int64_t block_bytes = Q6 ? 384 : 256;
  for (int64_t p = p0; p < p1; ++p) {
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int64_t i = 0; i < m; ++i) {
        float acc = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* wb = w + (p * nb + b) * block_bytes;
          const int8_t* xb = xq + i * k + b * kBlock;
          int32_t dots[2] = {0, 0};
          for (int t = 0; t < 8; ++t) {  // quad t of the block: quads 0..3 are the first half of 16
            for (int e = 0; e < 4; ++e) {
              const uint8_t byte = wb[(t % 4) * 64 + lane * 4 + e];
              int32_t code = t < 4 ? (byte & 0x0F) : (byte >> 4);
              if (Q6) code |= ((wb[256 + (t / 4) * 64 + lane * 4 + e] >> (2 * (t % 4))) & 3) << 4;
              dots[t / 4] += code * xb[4 * t + e];
            }
          }
          if (Q6) {
            const float d = static_cast<float>(sup[(p * (nb / 8) + b / 8) * 16 + lane]);
            const int8_t* sc = static_cast<const int8_t*>(wsc) + (p * nb + b) * 32 + lane;
            for (int h = 0; h < 2; ++h) {
              const float ds = d * static_cast<float>(sc[16 * h]);
              const float c = static_cast<float>(dots[h] - 32 * xh[(i * nb + b) * 2 + h]);
              acc = std::fma(c, ds * xd[i * nb + b], acc);
            }
          } else {
            const at::Half* s = sup + (p * (nb / 8) + b / 8) * 32 + lane;
            const int64_t sb = (p * nb + b) * 16 + lane;
            const float dw = static_cast<float>(s[0]) * static_cast<float>(static_cast<const uint8_t*>(wsc)[sb]);
            const float mw = static_cast<float>(s[16]) * static_cast<float>(wm[sb]);
            acc = std::fma(static_cast<float>(dots[0] + dots[1]), dw * xd[i * nb + b], acc);
            acc = std::fma(-mw, xs[i * nb + b], acc);
          }
        }
        out[i * n + p * 16 + lane] = acc;
      }
    }
  }
}
}  // namespace scalar

// The sums of each row's int8 activation codes over every half block of 16 (the q6k format's -32 offset).
static at::Tensor half_block_sums(const int8_t* xq, int64_t m, int64_t k) {
  at::Tensor sums = at::empty({m, k / 16}, at::TensorOptions().dtype(at::kInt));
  int32_t* out = sums.data_ptr<int32_t>();
  for (int64_t i = 0; i < m * k / 16; ++i) {
    int32_t s = 0;
    for (int j = 0; j < 16; ++j) s += xq[i * 16 + j];
    out[i] = s;
  }
  return sums;
}

// x [M, K] float32. The weight in one of four formats (turbofan/kernels/quant.py), told apart by the scales' dtype:
//   q4:  qweight uint8 [N/16, K/32 * 256], scales float16 [N/16, K/32 * 16], mins float16 like scales;
//   q8:  qweight int8 [N/16, K/32 * 512], scales float16, wsum int32 like scales (the block sums of the codes);
//   q4k: qweight as q4, scales uint8 (6-bit sc), mins uint8 (6-bit m), wsum float16 [N/16, K/256 * 32]: per
//        super-block of 256 the 16 lanes' d, then their dmin;
//   q6k: qweight uint8 [N/16, K/32 * 384], scales int8 [N/16, K/32 * 32] (a scale per 16), wsum float16
//        [N/16, K/256 * 16] (d per super-block).
// bias [N] float32 or absent. Returns [M, N] float32.
at::Tensor qlinear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                   const c10::optional<at::Tensor>& mins, const c10::optional<at::Tensor>& wsum,
                   const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2, "qlinear: x must be [M, K]");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const bool kfmt = scales.scalar_type() == at::kByte || scales.scalar_type() == at::kChar;
  const bool q6k = scales.scalar_type() == at::kChar;
  const bool q4 = mins.has_value() && !kfmt;
  const int64_t m = x.size(0), k = x.size(1), panels = qweight.size(0), n = panels * 16;
  TORCH_CHECK(k % kBlock == 0, "qlinear: K must be a multiple of 32, got ", k);
  const int64_t nb = k / kBlock;
  TORCH_CHECK(scales.is_contiguous() && qweight.is_contiguous(), "qlinear: weights must be contiguous");
  if (kfmt) {
    TORCH_CHECK(k % 256 == 0, "qlinear: the K formats need K % 256 == 0, got ", k);
    TORCH_CHECK(qweight.size(1) == nb * (q6k ? 384 : 256), "qlinear: packed weight does not match K=", k);
    TORCH_CHECK(scales.numel() == panels * nb * (q6k ? 32 : 16), "qlinear: K-format scales do not match K=", k);
    TORCH_CHECK(wsum.has_value() && wsum->scalar_type() == at::kHalf && wsum->is_contiguous() &&
                    wsum->numel() == panels * (nb / 8) * (q6k ? 16 : 32),
                "qlinear: K formats need their float16 super-block scales");
    TORCH_CHECK(q6k != mins.has_value(), "qlinear: q4k needs its uint8 mins, q6k has none");
    if (!q6k)
      TORCH_CHECK(mins->scalar_type() == at::kByte && mins->is_contiguous() && mins->numel() == scales.numel(),
                  "qlinear: q4k mins must be uint8 like its scales");
  } else {
    TORCH_CHECK(q4 != wsum.has_value(), "qlinear: pass mins for 4-bit weights or wsum for 8-bit weights");
    TORCH_CHECK(qweight.size(1) == nb * (q4 ? 256 : 512), "qlinear: packed weight does not match K=", k);
    TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.numel() == panels * nb * 16,
                "qlinear: scales must be float16 [N/16, K/32 * 16]");
    if (q4) {
      TORCH_CHECK(mins->scalar_type() == at::kHalf && mins->is_contiguous() && mins->numel() == scales.numel(),
                  "qlinear: mins must be float16 like scales");
    } else {
      TORCH_CHECK(wsum->scalar_type() == at::kInt && wsum->is_contiguous() && wsum->numel() == scales.numel(),
                  "qlinear: wsum must be int32 like scales");
    }
  }
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0) return out;
  at::Tensor xq = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor xd = at::empty({m, nb}, x.options());
  at::Tensor xs = at::empty({m, nb}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = xq.data_ptr<int8_t>();
  float* dp = xd.data_ptr<float>();
  float* sp = xs.data_ptr<float>();
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  float* op = out.data_ptr<float>();
  const int64_t isa = g_isa;
  auto quantize = isa == kAvx512 ? avx512::quantize_rows : isa == kAvx2 ? avx2::quantize_rows : scalar::quantize_rows;
  if (m * k >= 16384) {
    at::parallel_for(0, m, 1, [&](int64_t r0, int64_t r1) { quantize(xp + r0 * k, r1 - r0, k, qp + r0 * k, dp + r0 * nb, sp + r0 * nb); });
  } else {
    quantize(xp, m, k, qp, dp, sp);
  }
  const int64_t grain = std::max<int64_t>(1, panels / (4 * at::get_num_threads()));
  if (kfmt) {
    const at::Tensor xh = q6k ? half_block_sums(qp, m, k) : at::zeros({1}, at::TensorOptions().dtype(at::kInt));
    const int32_t* hp = xh.data_ptr<int32_t>();
    const void* sc = scales.data_ptr();
    const uint8_t* mn = q6k ? nullptr : reinterpret_cast<const uint8_t*>(mins->data_ptr());
    const at::Half* sup = wsum->data_ptr<at::Half>();
    auto matmul = q6k ? (isa == kAvx512 ? avx512::matmul_panels_k<true> : isa == kAvx2 ? avx2::matmul_panels_k<true> : scalar::matmul_panels_k<true>)
                      : (isa == kAvx512 ? avx512::matmul_panels_k<false> : isa == kAvx2 ? avx2::matmul_panels_k<false> : scalar::matmul_panels_k<false>);
    at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) { matmul(wp, sc, mn, sup, p0, p1, k, qp, dp, sp, hp, m, op, n); });
  } else {
    const at::Half* wd = scales.data_ptr<at::Half>();
    const at::Half* wm = q4 ? mins->data_ptr<at::Half>() : nullptr;
    const int32_t* ws = q4 ? nullptr : wsum->data_ptr<int32_t>();
    auto matmul = q4 ? (isa == kAvx512 ? avx512::matmul_panels<true> : isa == kAvx2 ? avx2::matmul_panels<true> : scalar::matmul_panels<true>)
                     : (isa == kAvx512 ? avx512::matmul_panels<false> : isa == kAvx2 ? avx2::matmul_panels<false> : scalar::matmul_panels<false>);
    at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) { matmul(wp, wd, wm, ws, p0, p1, k, qp, dp, sp, m, op, n); });
  }
  if (bias.has_value()) out.add_(*bias);
  return out;
}

}  // namespace turbofan::qmm

TORCH_LIBRARY_FRAGMENT(turbofan, m) {
  m.def("qlinear(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, Tensor? wsum, Tensor? bias) -> Tensor");
}
TORCH_LIBRARY_IMPL(turbofan, CPU, m) { m.impl("qlinear", &turbofan::qmm::qlinear); }
