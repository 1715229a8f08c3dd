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
}  // namespace scalar

// x [M, K] float32; qweight: 4-bit uint8 [N/16, K/32 * 256] or 8-bit int8 [N/16, K/32 * 512] in panels;
// scales float16 [N/16, K/32 * 16]; mins (4-bit) the same; wsum (8-bit) int32 [N/16, K/32 * 16], the block sums
// of the codes; bias [N] float32 or absent. Returns [M, N] float32.
at::Tensor qlinear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                   const c10::optional<at::Tensor>& mins, const c10::optional<at::Tensor>& wsum,
                   const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2, "qlinear: x must be [M, K]");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const bool q4 = mins.has_value();
  TORCH_CHECK(q4 != wsum.has_value(), "qlinear: pass mins for 4-bit weights or wsum for 8-bit weights");
  const int64_t m = x.size(0), k = x.size(1), panels = qweight.size(0), n = panels * 16;
  TORCH_CHECK(k % kBlock == 0, "qlinear: K must be a multiple of 32, got ", k);
  const int64_t nb = k / kBlock;
  TORCH_CHECK(qweight.is_contiguous() && qweight.size(1) == nb * (q4 ? 256 : 512),
              "qlinear: packed weight does not match K=", k);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.numel() == panels * nb * 16,
              "qlinear: scales must be float16 [N/16, K/32 * 16]");
  if (q4) {
    TORCH_CHECK(mins->scalar_type() == at::kHalf && mins->is_contiguous() && mins->numel() == scales.numel(),
                "qlinear: mins must be float16 like scales");
  } else {
    TORCH_CHECK(wsum->scalar_type() == at::kInt && wsum->is_contiguous() && wsum->numel() == scales.numel(),
                "qlinear: wsum must be int32 like scales");
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
  const at::Half* wd = scales.data_ptr<at::Half>();
  const at::Half* wm = q4 ? mins->data_ptr<at::Half>() : nullptr;
  const int32_t* ws = q4 ? nullptr : wsum->data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const int64_t isa = g_isa;
  auto quantize = isa == kAvx512 ? avx512::quantize_rows : isa == kAvx2 ? avx2::quantize_rows : scalar::quantize_rows;
  if (m * k >= 16384) {
    at::parallel_for(0, m, 1, [&](int64_t r0, int64_t r1) { quantize(xp + r0 * k, r1 - r0, k, qp + r0 * k, dp + r0 * nb, sp + r0 * nb); });
  } else {
    quantize(xp, m, k, qp, dp, sp);
  }
  auto matmul = q4 ? (isa == kAvx512 ? avx512::matmul_panels<true> : isa == kAvx2 ? avx2::matmul_panels<true> : scalar::matmul_panels<true>)
                   : (isa == kAvx512 ? avx512::matmul_panels<false> : isa == kAvx2 ? avx2::matmul_panels<false> : scalar::matmul_panels<false>);
  const int64_t grain = std::max<int64_t>(1, panels / (4 * at::get_num_threads()));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) { matmul(wp, wd, wm, ws, p0, p1, k, qp, dp, sp, m, op, n); });
  if (bias.has_value()) out.add_(*bias);
  return out;
}

}  // namespace turbofan::qmm

TORCH_LIBRARY_FRAGMENT(turbofan, m) {
  m.def("qlinear(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, Tensor? wsum, Tensor? bias) -> Tensor");
}
TORCH_LIBRARY_IMPL(turbofan, CPU, m) { m.impl("qlinear", &turbofan::qmm::qlinear); }
