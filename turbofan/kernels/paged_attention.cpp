// Varlen paged attention that reads the paged KV cache in place (issue 15).
//
//   turbofan::paged_attention_varlen(q [T,H,D], k, v [T,KVH,D], k_cache!, v_cache! [S,KVH,D], slot_mapping [T],
//                                    block_tables [B,W], query_start_loc [B+1], context_lens [B],
//                                    block_size, scale, window) -> [T,H,D]
//
// First this step's k/v rows are written into their slots, then every query row attends over its own sequence's
// context through the block table: no padded copy, online softmax in float32. Sequence b owns query rows
// query_start_loc[b] .. query_start_loc[b+1] (Q of them) and has C = context_lens[b] tokens in the cache after
// the write; its query i sits at position C-Q+i and sees positions p with p <= that position and, with a window
// w > 0, p > position - w. One op covers decode rows (Q = 1), fresh prefills and prefill chunks after a cached
// context, in any mix.
//
// Work is split into units of (sequence, kv head, tile of queries[, slice of keys]). The query heads that share a
// kv head are processed together, so each K/V row is read once per tile (GQA without repeating K/V). Units run on
// at::parallel_for's threads, claimed longest-first from a shared counter. When there are few units (one long
// decode, say) the key range is split and the slices merged afterwards (flash-decoding), so both cores work.
//
// Two inner kernels, called once per chunk of keys:
//   row form   - queries as rows [M][D]: dot products of each row with each key, 4 keys reduced together.
//                Used for decode tiles (one query position, M = query heads per kv head) and by the scalar path.
//   lanes form - queries along the vector lanes ([D][Mp], transposed once per tile): scores, max, exp and the
//                running sums are all vertical, so a prefill tile of up to 4 vectors of query rows runs at
//                FMA speed with K/V elements broadcast straight from the cache.
// Both are written once, in paged_attention_chunk.h, over a small vector type (Vec: the width's intrinsics, and
// the few operations AVX-512 and AVX2 do differently), and compiled twice below: for AVX-512 (16 lanes) and for
// AVX2 (8 lanes), each inside its own `#pragma GCC target` region and namespace. The scalar path (row form only)
// is plain C++. The ISA level is turbofan::g_isa (set from Python at run time); the AVX paths need head_dim % 16
// (AVX-512) or % 8 (AVX2) and otherwise drop to the next level that fits.
//
// KV cache dtype: float32 or float16 (k_cache and v_cache alike; q/k/v and the output are always float32). A
// float16 cache halves the bytes a decode step reads. This step's k/v are rounded to float16 (to nearest even,
// as torch's .half()) when written into their slots, and cache rows are widened to float32 as they are read, so
// all arithmetic stays float32 and a float16 cache gives exactly what a float32 cache holding the rounded values
// gives (the same operations in the same order). The inner kernels are templates on the cache element type:
// their float instantiation is the float32 path, unchanged; the at::Half one loads K/V through vcvtph2ps (F16C
// / AVX-512F) where the float one loads directly. Where widening on every load does not pay (the AVX2 lanes
// form, which broadcasts single elements; the scalar path, c10::Half -> float per element) each chunk's rows
// are widened once into per-thread staging buffers [nc][D] and the float kernels run on those.
#include <cpuid.h>
#include <atomic>
#include <limits>
#include <type_traits>

namespace turbofan {
namespace attn {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kExpLow = -87.3365447505f, kExpHigh = 88.3762626647949f;  // the vector exp's input range
constexpr int kMaxRows = 64;       // query rows per tile (row form)
constexpr int kMinSplitKeys = 256;  // a key slice of a split unit is at least this long
constexpr int64_t kPerPositionRows = 33;  // without prompt_lens: a sequence of at most this many rows is generated rows
constexpr int64_t kPrefetchBytes = 64 << 10;  // how far ahead (K and V bytes) the prefetch walker runs

// One chunk of at most `nc` keys for one tile. Layouts depend on the form (see above).
struct Chunk {
  const float* q;   // row: [M][D] (scaled); lanes: [D][Mp] (scaled, zero in padding lanes)
  float* o;         // row: [M][D]; lanes: [D][Mp]  - unnormalised output, rescaled as the max moves
  float* s;         // row: [M][nc]; lanes: [nc][Mp] - scores, then probabilities
  float* m;         // running max per row / lane
  float* l;         // running sum per row / lane
  float* alpha;     // this chunk's rescale factor per row / lane
  const int32_t* lo;  // first visible key position per row / lane
  const int32_t* hi;  // last visible key position per row / lane
  const float* const* kp;  // key j's row in the cache (float16 cache: its float32 copy in the staging buffer)
  const float* const* vp;
  const at::Half* const* kh;  // float16 cache read in place (the at::Half kernels): key j's row in the cache
  const at::Half* const* vh;
  int M, Mp, D, nc, n, p0;
  bool masked;  // some key in this chunk is outside some row's [lo, hi]
};

using ChunkFn = void (*)(const Chunk&);
using WidenFn = void (*)(const at::Half* const* rows, float* dst, int n, int D);  // n rows of D -> dst [n][D]
using NarrowFn = void (*)(const float* src, at::Half* dst, int64_t n);

// The kernels of one ISA level.
struct Kernels {
  ChunkFn row;
  ChunkFn lanes;       // nullptr: no lanes kernel (scalar)
  ChunkFn row_half;    // float16 cache: row form reading c.kh/c.vh itself; nullptr: staged rows and `row`
  ChunkFn lanes_half;  // float16 cache: lanes form reading c.kh/c.vh itself; nullptr: staged rows and `lanes`
  WidenFn widen;       // float16 cache: widens a chunk's rows into the staging buffers
  NarrowFn narrow;     // float16 cache: rounds this step's k/v rows as they are written
  int vl;              // lanes per vector
};

// The rows a kernel instantiated on T reads: float32 rows (kp/vp), or float16 rows widened on load (kh/vh).
template <typename T>
static inline const T* const* key_rows(const Chunk& c);
template <>
inline const float* const* key_rows<float>(const Chunk& c) { return c.kp; }
template <>
inline const at::Half* const* key_rows<at::Half>(const Chunk& c) { return c.kh; }
template <typename T>
static inline const T* const* value_rows(const Chunk& c);
template <>
inline const float* const* value_rows<float>(const Chunk& c) { return c.vp; }
template <>
inline const at::Half* const* value_rows<at::Half>(const Chunk& c) { return c.vh; }

// ---------------------------------------------------------------------------------------------------------------
// Scalar (and the reference for the vector paths' structure)

static inline void mask_rows(const Chunk& c) {
  for (int r = 0; r < c.M; ++r) {
    float* sr = c.s + static_cast<size_t>(r) * c.nc;
    for (int j = 0; j < c.n; ++j) {
      const int p = c.p0 + j;
      if (p < c.lo[r] || p > c.hi[r]) sr[j] = kNegInf;
    }
  }
}

static void row_chunk_scalar(const Chunk& c) {
  const int D = c.D;
  for (int r = 0; r < c.M; ++r) {
    const float* qr = c.q + static_cast<size_t>(r) * D;
    float* sr = c.s + static_cast<size_t>(r) * c.nc;
    for (int j = 0; j < c.n; ++j) {
      const float* kr = c.kp[j];
      float acc = 0.f;
      for (int d = 0; d < D; ++d) acc += qr[d] * kr[d];
      sr[j] = acc;
    }
  }
  if (c.masked) mask_rows(c);
  for (int r = 0; r < c.M; ++r) {
    float* sr = c.s + static_cast<size_t>(r) * c.nc;
    float mx = kNegInf;
    for (int j = 0; j < c.n; ++j) mx = std::max(mx, sr[j]);
    const float mnew = std::max(c.m[r], mx);
    float* orow = c.o + static_cast<size_t>(r) * D;
    if (mnew == kNegInf) continue;  // nothing visible to this row yet
    const float alpha = c.m[r] == kNegInf ? 0.f : std::exp(c.m[r] - mnew);
    float sum = 0.f;
    for (int j = 0; j < c.n; ++j) {
      sr[j] = std::exp(sr[j] - mnew);
      sum += sr[j];
    }
    c.l[r] = c.l[r] * alpha + sum;
    c.m[r] = mnew;
    for (int d = 0; d < D; ++d) orow[d] *= alpha;
    for (int j = 0; j < c.n; ++j) {
      const float p = sr[j];
      const float* vr = c.vp[j];
      for (int d = 0; d < D; ++d) orow[d] += p * vr[d];
    }
  }
}

static void widen_rows_scalar(const at::Half* const* rows, float* dst, int n, int D) {
  for (int j = 0; j < n; ++j) {
    const at::Half* r = rows[j];
    float* o = dst + static_cast<size_t>(j) * D;
    for (int d = 0; d < D; ++d) o[d] = static_cast<float>(r[d]);
  }
}

// Round to nearest even, as c10::Half(float) and torch's .half() do.
static void narrow_scalar(const float* src, at::Half* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = at::Half(src[i]);
}

// ---------------------------------------------------------------------------------------------------------------
// AVX-512: the kernels of paged_attention_chunk.h on 16 lanes

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
namespace avx512 {
#define TF_MM(name) _mm512_##name
struct Isa {
  static constexpr int W = 16;
  using R = __m512;
  static R load(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static R bcast(const at::Half* p) {  // vpbroadcastw + vcvtph2ps
    return _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(p->x)));
  }
  static void store_half(at::Half* p, R x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static R round(R x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static R ldexp_live(R y, R n, R x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLow), _CMP_GE_OQ);
    return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(y, n));
  }
  static __m128 fold128(R x) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  }
  static float hmax(R x) { return _mm512_reduce_max_ps(x); }
  static R keep_between(const int32_t* lo, const int32_t* hi, int p, R s, R fill) {
    const __m512i pv = _mm512_set1_epi32(p);
    const __mmask16 in = _mm512_cmp_epi32_mask(_mm512_loadu_si512(lo), pv, _MM_CMPINT_LE) &
                         _mm512_cmp_epi32_mask(pv, _mm512_loadu_si512(hi), _MM_CMPINT_LE);
    return _mm512_mask_mov_ps(fill, in, s);
  }
  static constexpr int kRowPvVecs = 4;
  static constexpr int kQkKeys[5] = {0, 8, 8, 4, 4};
  static constexpr int kPvDims[5] = {0, 16, 8, 4, 4};
  static constexpr bool kLanesHalf = true;
};
#include "paged_attention_chunk.h"
#undef TF_MM
}  // namespace avx512
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------------------
// AVX2: the same kernels on 8 lanes (f16c: float16 cache rows; no float32 code uses it)

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define TF_MM(name) _mm256_##name
struct Isa {
  static constexpr int W = 8;
  using R = __m256;
  static R load(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static R bcast(const at::Half* p) { return _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(p->x))); }
  static void store_half(at::Half* p, R x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static R round(R x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static R ldexp_live(R y, R n, R x) {  // 2^n for n in [-126, 128) straight into the exponent bits
    const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLow), _CMP_GE_OQ);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), live);
  }
  static __m128 fold128(R x) { return _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1)); }
  static float hmax(R x) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  }
  static R keep_between(const int32_t* lo, const int32_t* hi, int p, R s, R fill) {
    const __m256i pv = _mm256_set1_epi32(p);
    const __m256i out = _mm256_or_si256(_mm256_cmpgt_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo)), pv),
                                        _mm256_cmpgt_epi32(pv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi))));
    return _mm256_blendv_ps(s, fill, _mm256_castsi256_ps(out));
  }
  static constexpr int kRowPvVecs = 2;
  static constexpr int kQkKeys[5] = {0, 8, 4, 3, 2};
  static constexpr int kPvDims[5] = {0, 8, 4, 2, 2};
  // A float16 cache: a broadcast + convert per element measured 10-25% slower here than one widening pass per
  // chunk, so AVX2's lanes form reads staged rows (AVX-512's reads the cache in place).
  static constexpr bool kLanesHalf = false;
};
#include "paged_attention_chunk.h"
#undef TF_MM
}  // namespace avx2
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------------------
// Driver

static bool cpu_has_f16c() {
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & bit_F16C) != 0;
  }();
  return has;
}

// A float16 cache (see the header): the AVX row forms and the AVX-512 lanes form widen K/V straight from the
// cache as they load them; AVX2's lanes form and the scalar path read the chunk's rows widened once into the
// staging buffers. The AVX2 level needs F16C for float16 (every AVX2 CPU known has it; otherwise scalar).
static Kernels kernels_for(int64_t level, bool half) {
  if (level >= kAvx512) return avx512::kernels();
  if (level == kAvx2 && !(half && !cpu_has_f16c())) return avx2::kernels();
  return {&row_chunk_scalar, nullptr, nullptr, nullptr, &widen_rows_scalar, &narrow_scalar, 1};
}

struct Problem {
  const float* q;
  int64_t q_tok, q_head;  // strides (elements); the last dim is contiguous
  float* out;             // [T, H, D] contiguous
  const char* k_cache;    // [S, KVH, D] of float (elem_bytes 4) or at::Half (elem_bytes 2)
  const char* v_cache;
  int64_t elem_bytes;
  WidenFn widen;          // float16 cache: widens a chunk's rows into the staging buffers; nullptr for float32
  const int64_t* block_tables;
  int64_t bt_stride;
  const int64_t* qsl;
  const int64_t* ctx;
  const int64_t* prompt_lens;  // [B] or nullptr: rows at positions >= prompt_lens[b] are generated tokens
  int64_t H, KVH, D, group, block_size, window, slot_stride;
  float scale;
};

struct Unit {
  int64_t cost;
  int32_t b, g, q0, q1;  // sequence, kv head, query rows [q0, q1) of the sequence
  int32_t k0, k1;        // key positions [k0, k1)
  int64_t partial;       // float offset of this slice's (m, l, o) in the partial buffer; -1: write the output
  bool lanes;
  bool per_position;     // a generated token's row: split by its own key count only
};

struct Scratch {
  std::vector<float> q, o, s, m, l, alpha;
  std::vector<int32_t> lo, hi;
  std::vector<const float*> kp, vp;
  std::vector<float> kst, vst;          // float16 cache, staged: this chunk's K/V rows widened to float32 [nc][D]
  std::vector<const at::Half*> kh, vh;  // float16 cache: this chunk's rows in the cache
};

static int chunk_keys(int64_t D) { return D <= 128 ? 32 : 16; }

static void run_unit(const Problem& P, const Kernels& K, const Unit& u, float* partials, Scratch& sc) {
  const int D = static_cast<int>(P.D);
  const int group = static_cast<int>(P.group);
  const int nq = u.q1 - u.q0;
  const int M = nq * group;
  const int Mp = u.lanes ? (M + K.vl - 1) / K.vl * K.vl : M;
  const int nc = chunk_keys(D);
  const int64_t qbase = P.qsl[u.b];
  const int64_t first = P.ctx[u.b] - (P.qsl[u.b + 1] - qbase);  // position of the sequence's query 0

  sc.q.assign(static_cast<size_t>(Mp) * D, 0.f);
  sc.o.assign(static_cast<size_t>(Mp) * D, 0.f);
  sc.s.resize(static_cast<size_t>(Mp) * nc + 16);
  sc.m.assign(Mp, kNegInf);
  sc.l.assign(Mp, 0.f);
  sc.alpha.resize(Mp);
  sc.lo.assign(Mp, std::numeric_limits<int32_t>::max());
  sc.hi.assign(Mp, std::numeric_limits<int32_t>::min());
  sc.kp.resize(nc);
  sc.vp.resize(nc);
  const bool half = P.widen != nullptr;
  const bool stage = half && (u.lanes ? K.lanes_half == nullptr : K.row_half == nullptr);
  if (half) {
    sc.kh.resize(nc);
    sc.vh.resize(nc);
  }
  if (stage) {
    sc.kst.resize(static_cast<size_t>(nc) * D);
    sc.vst.resize(static_cast<size_t>(nc) * D);
    for (int j = 0; j < nc; ++j) {  // the inner kernels read the staged rows
      sc.kp[j] = sc.kst.data() + static_cast<size_t>(j) * D;
      sc.vp[j] = sc.vst.data() + static_cast<size_t>(j) * D;
    }
  }

  int32_t max_lo = 0, min_hi = std::numeric_limits<int32_t>::max();
  for (int i = 0; i < nq; ++i) {
    const int64_t pos = first + u.q0 + i;
    const int32_t lo = P.window > 0 ? static_cast<int32_t>(std::max<int64_t>(0, pos - P.window + 1)) : 0;
    max_lo = std::max(max_lo, lo);
    min_hi = std::min(min_hi, static_cast<int32_t>(pos));
    const float* qt = P.q + (qbase + u.q0 + i) * P.q_tok;
    for (int hh = 0; hh < group; ++hh) {
      const int r = i * group + hh;
      sc.lo[r] = lo;
      sc.hi[r] = static_cast<int32_t>(pos);
      const float* qr = qt + (u.g * P.group + hh) * P.q_head;
      if (u.lanes) {
        for (int d = 0; d < D; ++d) sc.q[static_cast<size_t>(d) * Mp + r] = qr[d] * P.scale;
      } else {
        for (int d = 0; d < D; ++d) sc.q[static_cast<size_t>(r) * D + d] = qr[d] * P.scale;
      }
    }
  }

  Chunk c;
  c.q = sc.q.data();
  c.o = sc.o.data();
  c.s = sc.s.data();
  c.m = sc.m.data();
  c.l = sc.l.data();
  c.alpha = sc.alpha.data();
  c.lo = sc.lo.data();
  c.hi = sc.hi.data();
  c.kp = sc.kp.data();
  c.vp = sc.vp.data();
  c.kh = sc.kh.data();
  c.vh = sc.vh.data();
  c.M = M;
  c.Mp = Mp;
  c.D = D;
  c.nc = nc;
  ChunkFn fn = u.lanes ? K.lanes : K.row;
  if (half && !stage) fn = u.lanes ? K.lanes_half : K.row_half;
  const int64_t* table = P.block_tables + u.b * P.bt_stride;
  const int64_t bs = P.block_size;
  const int64_t head_off = u.g * P.D;
  // Walk the block table incrementally (no division per key). A second walker runs ahead and prefetches the
  // rows of keys still to come into L2: contexts sit in scattered blocks, which hardware prefetchers do not follow.
  int64_t blk = u.k0 / bs, off = u.k0 % bs;
  int64_t base = table[blk] * bs;
  int64_t pf_blk = blk, pf_off = off, pf_base = base;
  int32_t pf_pos = u.k0;
  const int64_t eb = P.elem_bytes;
  const int64_t row_bytes = P.D * eb;
  const int32_t ahead = static_cast<int32_t>(std::max<int64_t>(nc, kPrefetchBytes / (2 * row_bytes)));
  for (int32_t p0 = u.k0; p0 < u.k1; p0 += nc) {
    const int n = static_cast<int>(std::min<int64_t>(nc, u.k1 - p0));
    const int32_t pf_end = static_cast<int32_t>(std::min<int64_t>(u.k1, static_cast<int64_t>(p0) + n + ahead));
    for (; pf_pos < pf_end; ++pf_pos) {
      const int64_t row = (pf_base + pf_off) * P.slot_stride + head_off;
      const char* kr = P.k_cache + row * eb;
      const char* vr = P.v_cache + row * eb;
      for (int64_t b = 0; b < row_bytes; b += 64) {
        _mm_prefetch(kr + b, _MM_HINT_T1);
        _mm_prefetch(vr + b, _MM_HINT_T1);
      }
      if (++pf_off == bs && pf_pos + 1 < u.k1) {
        pf_off = 0;
        pf_base = table[++pf_blk] * bs;
      }
    }
    if (!half) {  // float32: the kernels read the cache rows in place
      for (int j = 0; j < n; ++j) {
        const int64_t row = (base + off) * P.slot_stride + head_off;
        sc.kp[j] = reinterpret_cast<const float*>(P.k_cache) + row;
        sc.vp[j] = reinterpret_cast<const float*>(P.v_cache) + row;
        if (++off == bs && p0 + j + 1 < u.k1) {
          off = 0;
          base = table[++blk] * bs;
        }
      }
    } else {  // float16: the rows in the cache, widened into the staging buffers (kp/vp) where the form needs it
      for (int j = 0; j < n; ++j) {
        const int64_t row = (base + off) * P.slot_stride + head_off;
        sc.kh[j] = reinterpret_cast<const at::Half*>(P.k_cache) + row;
        sc.vh[j] = reinterpret_cast<const at::Half*>(P.v_cache) + row;
        if (++off == bs && p0 + j + 1 < u.k1) {
          off = 0;
          base = table[++blk] * bs;
        }
      }
      if (stage) {
        P.widen(sc.kh.data(), sc.kst.data(), n, D);
        P.widen(sc.vh.data(), sc.vst.data(), n, D);
      }
    }
    c.n = n;
    c.p0 = p0;
    c.masked = !(p0 >= max_lo && p0 + n - 1 <= min_hi);
    fn(c);
  }

  // out = o / l, or the slice's (m, l, o) for the merge
  for (int i = 0; i < nq; ++i) {
    for (int hh = 0; hh < group; ++hh) {
      const int r = i * group + hh;
      float* dst;
      float inv;
      if (u.partial < 0) {
        dst = P.out + ((qbase + u.q0 + i) * P.H + u.g * P.group + hh) * P.D;
        inv = 1.f / sc.l[r];
      } else {
        float* rec = partials + u.partial + static_cast<int64_t>(r) * (D + 2);
        rec[0] = sc.m[r];
        rec[1] = sc.l[r];
        dst = rec + 2;
        inv = 1.f;
      }
      if (u.lanes) {
        for (int d = 0; d < D; ++d) dst[d] = sc.o[static_cast<size_t>(d) * Mp + r] * inv;
      } else {
        const float* src = sc.o.data() + static_cast<size_t>(r) * D;
        for (int d = 0; d < D; ++d) dst[d] = src[d] * inv;
      }
    }
  }
}

// The units of one call: tiles of queries per (sequence, kv head), long ones split by keys when the whole call
// would otherwise leave threads idle. `splits` lists, per split tile, its first unit and slice count.
struct Plan {
  std::vector<Unit> units;
  std::vector<std::pair<int64_t, int32_t>> splits;
  int64_t partial_floats = 0;
  int64_t total_cost = 0;
};

static Plan make_plan(const Problem& P, const Kernels& K, int64_t B, int64_t threads) {
  Plan plan;
  std::vector<Unit> tiles;
  const int64_t lanes_rows = 4 * static_cast<int64_t>(K.vl);
  const bool lanes_ok = K.lanes != nullptr && P.group <= lanes_rows;
  const int64_t lanes_tile = std::max<int64_t>(1, lanes_rows / P.group);
  const int64_t row_tile = std::max<int64_t>(1, kMaxRows / P.group);
  const int64_t nc = chunk_keys(P.D);
  auto add_tile = [&](int64_t b, int64_t first, int64_t q0, int64_t q1, bool lanes, bool per_position) {
    int64_t k0 = P.window > 0 ? std::max<int64_t>(0, first + q0 - P.window + 1) : 0;
    if (!per_position) k0 -= k0 % nc;  // chunks at absolute multiples of nc: a row's sums do not depend on its tile
    const int64_t k1 = first + q1;
    const int64_t rows = (q1 - q0) * P.group;
    const int64_t width = lanes ? (rows + K.vl - 1) / K.vl * K.vl : rows;
    for (int64_t g = 0; g < P.KVH; ++g) {
      Unit u;
      u.cost = width * (k1 - k0 + 8);
      u.b = static_cast<int32_t>(b);
      u.g = static_cast<int32_t>(g);
      u.q0 = static_cast<int32_t>(q0);
      u.q1 = static_cast<int32_t>(q1);
      u.k0 = static_cast<int32_t>(k0);
      u.k1 = static_cast<int32_t>(k1);
      u.partial = -1;
      u.lanes = lanes;
      u.per_position = per_position;
      tiles.push_back(u);
      plan.total_cost += u.cost;
    }
  };
  for (int64_t b = 0; b < B; ++b) {
    const int64_t qlen = P.qsl[b + 1] - P.qsl[b];
    const int64_t first = P.ctx[b] - qlen;
    // Rows before `gen` are prompt rows: tiles of many positions (lanes form, where it serves), whose per-row
    // arithmetic does not depend on how the prompt was chunked. Rows from `gen` on are generated tokens (a decode
    // row, or a verify step's row plus its drafts, or a recomputed one): one row-form tile per position, so each
    // is computed exactly as its decode step computed it.
    const int64_t gen = P.prompt_lens != nullptr
                            ? std::clamp<int64_t>(P.prompt_lens[b] - first, 0, qlen)
                            : (qlen <= kPerPositionRows ? 0 : qlen);
    const int64_t tile = lanes_ok ? lanes_tile : row_tile;
    for (int64_t q0 = 0; q0 < gen; q0 += tile) add_tile(b, first, q0, std::min(gen, q0 + tile), lanes_ok, false);
    for (int64_t q0 = gen; q0 < qlen; ++q0) add_tile(b, first, q0, q0 + 1, false, true);
  }
  // A one-position tile is split by its own key count only, never by what else is in the call: a request's
  // numbers must not depend on its batch mates (batch invariance). Prompt tiles are not split.
  for (const Unit& t : tiles) {
    const int64_t keys = t.k1 - t.k0;
    const int64_t parts = threads > 1 && t.per_position ? keys / kMinSplitKeys : 1;
    if (parts <= 1) {
      plan.units.push_back(t);
      continue;
    }
    plan.splits.emplace_back(static_cast<int64_t>(plan.units.size()), static_cast<int32_t>(parts));
    const int64_t rows = (t.q1 - t.q0) * P.group;
    for (int64_t p = 0; p < parts; ++p) {
      Unit u = t;
      u.k0 = static_cast<int32_t>(t.k0 + keys * p / parts);
      u.k1 = static_cast<int32_t>(t.k0 + keys * (p + 1) / parts);
      u.cost = t.cost * (u.k1 - u.k0) / keys;
      u.partial = plan.partial_floats;
      plan.partial_floats += rows * (P.D + 2);
      plan.units.push_back(u);
    }
  }
  return plan;
}

// Merge the slices of a split tile: softmax-weighted sum of the slices' partial outputs.
static void merge_split(const Problem& P, const Plan& plan, int64_t index, const float* partials) {
  const auto [first, parts] = plan.splits[index];
  const Unit& u = plan.units[first];
  const int64_t D = P.D;
  const int64_t rows = (u.q1 - u.q0) * P.group;
  const int64_t qbase = P.qsl[u.b];
  for (int64_t r = 0; r < rows; ++r) {
    float mx = kNegInf;
    for (int32_t p = 0; p < parts; ++p) mx = std::max(mx, partials[plan.units[first + p].partial + r * (D + 2)]);
    const int64_t i = r / P.group, hh = r % P.group;
    float* dst = P.out + ((qbase + u.q0 + i) * P.H + u.g * P.group + hh) * D;
    std::fill(dst, dst + D, 0.f);
    float denom = 0.f;
    for (int32_t p = 0; p < parts; ++p) {
      const float* rec = partials + plan.units[first + p].partial + r * (D + 2);
      if (rec[0] == kNegInf) continue;
      const float w = std::exp(rec[0] - mx);
      denom += w * rec[1];
      for (int64_t d = 0; d < D; ++d) dst[d] += w * rec[2 + d];
    }
    const float inv = 1.f / denom;
    for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
  }
}

static void write_kv(const at::Tensor& src, const at::Tensor& cache, const int64_t* slots, int64_t T) {
  const int64_t KVH = cache.size(1), D = cache.size(2);
  const float* s = src.data_ptr<float>();
  const int64_t st = src.stride(0), sh = src.stride(1);
  const bool rows_contiguous = sh == D;
  if (cache.scalar_type() == at::kHalf) {  // rounded to float16 on the way in
    at::Half* dst = cache.data_ptr<at::Half>();
    const NarrowFn narrow = kernels_for(g_isa, true).narrow;
    at::parallel_for(0, T, 256, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        at::Half* row = dst + slots[t] * KVH * D;
        if (rows_contiguous) {
          narrow(s + t * st, row, KVH * D);
        } else {
          for (int64_t h = 0; h < KVH; ++h) narrow(s + t * st + h * sh, row + h * D, D);
        }
      }
    });
    return;
  }
  float* dst = cache.data_ptr<float>();
  at::parallel_for(0, T, 256, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* row = dst + slots[t] * KVH * D;
      if (rows_contiguous) {
        std::memcpy(row, s + t * st, sizeof(float) * KVH * D);
      } else {
        for (int64_t h = 0; h < KVH; ++h) std::memcpy(row + h * D, s + t * st + h * sh, sizeof(float) * D);
      }
    }
  });
}

static at::Tensor index_arg(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, "paged_attention_varlen: ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "paged_attention_varlen: ", name, " must be on the CPU");
  return t.contiguous();
}

at::Tensor paged_attention_varlen(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                  const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& slot_mapping_in, const at::Tensor& block_tables_in,
                                  const at::Tensor& query_start_loc_in, const at::Tensor& context_lens_in,
                                  int64_t block_size, double scale, int64_t window,
                                  const c10::optional<at::Tensor>& prompt_lens_in) {
  for (const at::Tensor* t : {&q_in, &k_in, &v_in})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "turbofan::paged_attention_varlen supports float32 q/k/v only (got ",
                t->scalar_type(), "); use the PyTorch attention path for other dtypes");
  for (const at::Tensor* t : {&k_cache, &v_cache})
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kHalf,
                "turbofan::paged_attention_varlen supports a float32 or float16 KV cache only (got ",
                t->scalar_type(), "); use the PyTorch attention path for other dtypes");
  for (const at::Tensor* t : {&q_in, &k_in, &v_in, &k_cache, &v_cache})
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 3, "paged_attention_varlen: q/k/v/caches must be 3-d CPU tensors");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "paged_attention_varlen: k_cache is ",
              k_cache.scalar_type(), " but v_cache is ", v_cache.scalar_type());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_attention_varlen: caches must be contiguous");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "paged_attention_varlen: k_cache and v_cache differ in shape");
  const int64_t T = q_in.size(0), H = q_in.size(1), D = q_in.size(2);
  const int64_t S = k_cache.size(0), KVH = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D, "paged_attention_varlen: head_dim of q (", D, ") and cache (", k_cache.size(2), ") differ");
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "paged_attention_varlen: ", H, " query heads are not a multiple of ", KVH, " kv heads");
  for (const at::Tensor* t : {&k_in, &v_in})
    TORCH_CHECK(t->size(0) == T && t->size(1) == KVH && t->size(2) == D,
                "paged_attention_varlen: k/v must be [", T, ", ", KVH, ", ", D, "], got ", t->sizes());
  TORCH_CHECK(block_size > 0, "paged_attention_varlen: block_size must be positive");
  const at::Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(2) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(2) == 1 ? v_in : v_in.contiguous();
  const at::Tensor slot_mapping = index_arg(slot_mapping_in, "slot_mapping");
  const at::Tensor block_tables = index_arg(block_tables_in, "block_tables");
  const at::Tensor qsl_t = index_arg(query_start_loc_in, "query_start_loc");
  const at::Tensor ctx_t = index_arg(context_lens_in, "context_lens");
  const int64_t B = ctx_t.numel();
  at::Tensor prompt_t;
  if (prompt_lens_in.has_value() && prompt_lens_in->defined()) {
    prompt_t = index_arg(*prompt_lens_in, "prompt_lens");
    TORCH_CHECK(prompt_t.numel() >= B, "paged_attention_varlen: prompt_lens must have B = ", B, " entries");
  }
  TORCH_CHECK(slot_mapping.numel() == T, "paged_attention_varlen: slot_mapping has ", slot_mapping.numel(),
              " entries for ", T, " tokens");
  TORCH_CHECK(qsl_t.numel() == B + 1, "paged_attention_varlen: query_start_loc must have B + 1 = ", B + 1, " entries");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) >= B, "paged_attention_varlen: block_tables must be [B, W]");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t* qsl = qsl_t.data_ptr<int64_t>();
  const int64_t* ctx = ctx_t.data_ptr<int64_t>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t W = block_tables.size(1);
  const int64_t num_blocks = S / block_size;
  TORCH_CHECK(qsl[0] == 0 && qsl[B] == T, "paged_attention_varlen: query_start_loc must run from 0 to ", T);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t qlen = qsl[b + 1] - qsl[b];
    TORCH_CHECK(qlen >= 0 && qlen <= ctx[b], "paged_attention_varlen: sequence ", b, " has ", qlen,
                " queries but context ", ctx[b]);
    TORCH_CHECK(ctx[b] < (int64_t(1) << 30), "paged_attention_varlen: context too long");
    const int64_t used = (ctx[b] + block_size - 1) / block_size;
    TORCH_CHECK(used <= W, "paged_attention_varlen: sequence ", b, " needs ", used, " blocks, block table has ", W);
    for (int64_t j = 0; j < used; ++j)
      TORCH_CHECK(bt[b * W + j] >= 0 && bt[b * W + j] < num_blocks, "paged_attention_varlen: block ", bt[b * W + j],
                  " of sequence ", b, " is outside the cache (", num_blocks, " blocks)");
  }
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < S, "paged_attention_varlen: slot ", slots[t], " outside the cache");

  at::Tensor out = at::empty({T, H, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (T == 0) return out;
  write_kv(k, k_cache, slots, T);
  write_kv(v, v_cache, slots, T);

  int64_t level = g_isa;
  if (level >= kAvx512 && D % 16 != 0) level = kAvx2;
  if (level >= kAvx2 && D % 8 != 0) level = kScalar;
  const bool half = k_cache.scalar_type() == at::kHalf;
  const Kernels K = kernels_for(level, half);
  Problem P;
  P.q = q.data_ptr<float>();
  P.q_tok = q.stride(0);
  P.q_head = q.stride(1);
  P.out = out.data_ptr<float>();
  P.k_cache = static_cast<const char*>(k_cache.data_ptr());
  P.v_cache = static_cast<const char*>(v_cache.data_ptr());
  P.elem_bytes = static_cast<int64_t>(k_cache.element_size());
  P.widen = half ? K.widen : nullptr;
  P.block_tables = bt;
  P.bt_stride = W;
  P.qsl = qsl;
  P.ctx = ctx;
  P.prompt_lens = prompt_t.defined() ? prompt_t.data_ptr<int64_t>() : nullptr;
  P.H = H;
  P.KVH = KVH;
  P.D = D;
  P.group = H / KVH;
  P.block_size = block_size;
  P.window = window;
  P.slot_stride = KVH * D;
  P.scale = static_cast<float>(scale);

  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const Plan plan = make_plan(P, K, B, threads);
  std::vector<float> partials(plan.partial_floats);
  const int64_t n = static_cast<int64_t>(plan.units.size());
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return plan.units[a].cost > plan.units[b].cost; });
  std::atomic<int64_t> next{0};
  auto work = [&](int64_t, int64_t) {
    thread_local Scratch sc;
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1))
      run_unit(P, K, plan.units[order[i]], partials.data(), sc);
  };
  // below ~100k multiply-adds the fork/join costs more than the second core gives
  if (threads > 1 && n > 1 && plan.total_cost * D >= (int64_t(1) << 17)) {
    at::parallel_for(0, std::min(threads, n), 1, work);
  } else {
    work(0, 1);
  }
  const int64_t nsplit = static_cast<int64_t>(plan.splits.size());
  if (nsplit > 0) {
    at::parallel_for(0, nsplit, 4, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) merge_split(P, plan, s, partials.data());
    });
  }
  return out;
}

}  // namespace attn
}  // namespace turbofan

TORCH_LIBRARY_FRAGMENT(turbofan, m) {
  m.def(
      "paged_attention_varlen(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping, Tensor block_tables, Tensor query_start_loc, Tensor context_lens, int block_size, "
      "float scale, int window, Tensor? prompt_lens=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(turbofan, CPU, m) {
  m.impl("paged_attention_varlen", &turbofan::attn::paged_attention_varlen);
}
