// The vector inner kernels of paged_attention.cpp, written once for any vector width. paged_attention.cpp
// includes this file once per ISA inside a `#pragma GCC target(...)` region and its own namespace, after defining
//   TF_MM(name)   the intrinsic `name` at this width (_mm512_##name or _mm256_##name): the ops both ISAs spell
//                 alike (loadu_ps, fmadd_ps, ...) are written once below, in Vec
//   struct Isa    what the ISAs do differently:
//     W, R                        lanes per vector, the float vector type
//     load(const at::Half*)       W float16 values widened to float32 (vcvtph2ps)
//     bcast(const at::Half*)      one float16 value widened into every lane
//     store_half(at::Half*, x)    x rounded to float16, to nearest even (as torch's .half())
//     round(x)                    to the nearest integer (ties to even)
//     ldexp_live(y, n, x)         y * 2^n, and exactly 0 in the lanes where x < kExpLow
//     fold128(x)                  x's 128-bit parts added down to one __m128 (lo + hi at each halving)
//     hmax(x)                     the horizontal max
//     keep_between(lo, hi, p, s, fill)  s in the lanes where lo[i] <= p <= hi[i] (W int32 each), fill elsewhere
//     kRowPvVecs                  vectors of a row the row form's P.V keeps in registers at once
//     kQkKeys[MV], kPvDims[MV]    the lanes form's register blocking at MV vectors of query lanes (keys per
//                                 pass of Q.K, output dims per pass of P.V)
//     kLanesHalf                  whether the lanes form reads a float16 cache in place (else staged rows)
// Each ISA's kernels do the same operations in the same order as they did when written out per ISA (their
// results are bitwise unchanged). AVX-512 and AVX2 differ from each other in summation order only: a dot
// product's partial sums run in W lanes before the horizontal sum.

struct Vec : Isa {
  using Isa::load;
  using Isa::bcast;
  static R zero() { return TF_MM(setzero_ps)(); }
  static R set1(float x) { return TF_MM(set1_ps)(x); }
  static R load(const float* p) { return TF_MM(loadu_ps)(p); }
  static R bcast(const float* p) { return TF_MM(set1_ps)(*p); }
  static void store(float* p, R x) { TF_MM(storeu_ps)(p, x); }
  static R add(R a, R b) { return TF_MM(add_ps)(a, b); }
  static R sub(R a, R b) { return TF_MM(sub_ps)(a, b); }
  static R mul(R a, R b) { return TF_MM(mul_ps)(a, b); }
  static R max(R a, R b) { return TF_MM(max_ps)(a, b); }
  static R fma(R a, R b, R c) { return TF_MM(fmadd_ps)(a, b, c); }   // a * b + c, one rounding
  static R fnma(R a, R b, R c) { return TF_MM(fnmadd_ps)(a, b, c); }  // c - a * b, one rounding

  // The horizontal sum: halves added down to 4 lanes, then (x0 + x2) + (x1 + x3) (as _mm512_reduce_add_ps).
  static float hsum(R x) {
    __m128 h = fold128(x);
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }

  // The four horizontal sums of a, b, c, d in one __m128.
  static __m128 hsum4(R a, R b, R c, R d) {
    const R ab = add(TF_MM(unpacklo_ps)(a, b), TF_MM(unpackhi_ps)(a, b));
    const R cd = add(TF_MM(unpacklo_ps)(c, d), TF_MM(unpackhi_ps)(c, d));
    return fold128(add(TF_MM(shuffle_ps)(ab, cd, 0x44), TF_MM(shuffle_ps)(ab, cd, 0xEE)));
  }

  // Cephes expf: x = n ln2 + r, e^r by a degree-6 polynomial, times 2^n. About 1 ulp; exactly 0 for
  // x < -87.3 (so -inf, a masked score, gives 0).
  static R exp(R x0) {
    R x = max(TF_MM(min_ps)(x0, set1(kExpHigh)), set1(kExpLow));
    const R n = round(mul(x, set1(1.44269504088896341f)));
    x = fnma(n, set1(0.693359375f), x);
    x = fnma(n, set1(-2.12194440e-4f), x);
    R y = set1(1.9875691500e-4f);
    y = fma(y, x, set1(1.3981999507e-3f));
    y = fma(y, x, set1(8.3334519073e-3f));
    y = fma(y, x, set1(4.1665795894e-2f));
    y = fma(y, x, set1(1.6666665459e-1f));
    y = fma(y, x, set1(5.0000001201e-1f));
    y = fma(y, mul(x, x), add(x, set1(1.f)));
    return ldexp_live(y, n, x0);
  }
};

using R = Vec::R;
constexpr int W = Vec::W;

// ---------------------------------------------------------------------------------------------------------------
// Row form: queries as rows [M][D]

// Rows r0 .. r0+RN-1, dims d0 .. d0+NV*W-1: o = o * alpha + sum_j p[j] * v[j].
template <int RN, int NV, typename T>
static inline void row_pv(const Chunk& c, int r0, int d0) {
  R acc[RN][NV];
#pragma GCC unroll 4
  for (int r = 0; r < RN; ++r) {
    const R a = Vec::set1(c.alpha[r0 + r]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = Vec::mul(Vec::load(c.o + static_cast<size_t>(r0 + r) * c.D + d0 + W * v), a);
  }
  for (int j = 0; j < c.n; ++j) {
    const T* vr = value_rows<T>(c)[j] + d0;
    R vv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vv[v] = Vec::load(vr + W * v);
#pragma GCC unroll 4
    for (int r = 0; r < RN; ++r) {
      const R p = Vec::set1(c.s[static_cast<size_t>(r0 + r) * c.nc + j]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = Vec::fma(p, vv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) Vec::store(c.o + static_cast<size_t>(r0 + r) * c.D + d0 + W * v, acc[r][v]);
}

template <int RN, typename T>
static inline void row_pv_rows(const Chunk& c, int r0) {
  constexpr int NV = Vec::kRowPvVecs;
  int d0 = 0;
  for (; d0 + NV * W <= c.D; d0 += NV * W) row_pv<RN, NV, T>(c, r0, d0);
  for (; d0 < c.D; d0 += W) row_pv<RN, 1, T>(c, r0, d0);
}

template <typename T>
static void row_chunk(const Chunk& c) {
  const int D = c.D, n = c.n;
  const T* const* kp = key_rows<T>(c);
  for (int r = 0; r < c.M; ++r) {
    const float* qr = c.q + static_cast<size_t>(r) * D;
    float* sr = c.s + static_cast<size_t>(r) * c.nc;
    int j = 0;
    for (; j + 4 <= n; j += 4) {
      const T *k0 = kp[j], *k1 = kp[j + 1], *k2 = kp[j + 2], *k3 = kp[j + 3];
      R a0 = Vec::zero(), a1 = a0, a2 = a0, a3 = a0;
      for (int d = 0; d < D; d += W) {
        const R qv = Vec::load(qr + d);
        a0 = Vec::fma(qv, Vec::load(k0 + d), a0);
        a1 = Vec::fma(qv, Vec::load(k1 + d), a1);
        a2 = Vec::fma(qv, Vec::load(k2 + d), a2);
        a3 = Vec::fma(qv, Vec::load(k3 + d), a3);
      }
      _mm_storeu_ps(sr + j, Vec::hsum4(a0, a1, a2, a3));
    }
    for (; j < n; ++j) {
      R a0 = Vec::zero();
      for (int d = 0; d < D; d += W) a0 = Vec::fma(Vec::load(qr + d), Vec::load(kp[j] + d), a0);
      sr[j] = Vec::hsum(a0);
    }
  }
  if (c.masked) mask_rows(c);
  const int nv = (n + W - 1) & ~(W - 1);  // nc is a multiple of 16: pad the tail with -inf and use whole vectors
  for (int r = 0; r < c.M; ++r) {
    float* sr = c.s + static_cast<size_t>(r) * c.nc;
    for (int j = n; j < nv; ++j) sr[j] = kNegInf;
    R mx = Vec::set1(kNegInf);
    for (int j = 0; j < nv; j += W) mx = Vec::max(mx, Vec::load(sr + j));
    const float mnew = std::max(c.m[r], Vec::hmax(mx));
    if (mnew == kNegInf) {  // nothing visible to this row yet: contributes nothing, keeps its (zero) state
      c.alpha[r] = 1.f;
      for (int j = 0; j < nv; ++j) sr[j] = 0.f;
      continue;
    }
    const float alpha = c.m[r] == kNegInf ? 0.f : std::exp(c.m[r] - mnew);
    const R mb = Vec::set1(mnew);
    R sum = Vec::zero();
    for (int j = 0; j < nv; j += W) {
      const R p = Vec::exp(Vec::sub(Vec::load(sr + j), mb));
      Vec::store(sr + j, p);
      sum = Vec::add(sum, p);
    }
    c.l[r] = c.l[r] * alpha + Vec::hsum(sum);
    c.m[r] = mnew;
    c.alpha[r] = alpha;
  }
  int r0 = 0;
  for (; r0 + 4 <= c.M; r0 += 4) row_pv_rows<4, T>(c, r0);
  switch (c.M - r0) {
    case 3: row_pv_rows<3, T>(c, r0); break;
    case 2: row_pv_rows<2, T>(c, r0); break;
    case 1: row_pv_rows<1, T>(c, r0); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Lanes form: queries along the lanes ([D][Mp], MV vectors of them)

// The lanes form's register block: acc[a][.] += x(t, a) * y[t][.] for t < steps, A broadcast elements per step
// and MV vectors of query lanes (y: [steps][Mp]). Q.K: x(d, k) = key k's element d, y = the queries; P.V:
// x(j, e) = value j's element e, y = the probabilities.
template <int A, int MV, typename X>
static inline void lanes_block(R (&acc)[A][MV], const float* y, int Mp, int steps, X x) {
  for (int t = 0; t < steps; ++t) {
    R yv[MV];
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) yv[v] = Vec::load(y + static_cast<size_t>(t) * Mp + W * v);
#pragma GCC unroll 16
    for (int a = 0; a < A; ++a) {
      const R xb = Vec::bcast(x(t, a));
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) acc[a][v] = Vec::fma(xb, yv[v], acc[a][v]);
    }
  }
}

// Scores of keys j0 .. j0+KJ-1 for every query lane.
template <int MV, int KJ, typename T>
static inline void lanes_qk(const Chunk& c, int j0) {
  R acc[KJ][MV];
  const T* kr[KJ];
#pragma GCC unroll 8
  for (int k = 0; k < KJ; ++k) {
    kr[k] = key_rows<T>(c)[j0 + k];
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) acc[k][v] = Vec::zero();
  }
  lanes_block(acc, c.q, c.Mp, c.D, [&](int d, int k) { return kr[k] + d; });
#pragma GCC unroll 8
  for (int k = 0; k < KJ; ++k)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) Vec::store(c.s + static_cast<size_t>(j0 + k) * c.Mp + W * v, acc[k][v]);
}

// Output dims d0 .. d0+DB-1 for every query lane: o = o * alpha + sum_j p[j] * v[j].
template <int MV, int DB, typename T>
static inline void lanes_pv(const Chunk& c, int d0, const R* alpha) {
  R acc[DB][MV];
#pragma GCC unroll 16
  for (int e = 0; e < DB; ++e)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v)
      acc[e][v] = Vec::mul(Vec::load(c.o + static_cast<size_t>(d0 + e) * c.Mp + W * v), alpha[v]);
  const T* const* vr = value_rows<T>(c);
  lanes_block(acc, c.s, c.Mp, c.n, [&](int j, int e) { return vr[j] + d0 + e; });
#pragma GCC unroll 16
  for (int e = 0; e < DB; ++e)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) Vec::store(c.o + static_cast<size_t>(d0 + e) * c.Mp + W * v, acc[e][v]);
}

template <int MV, typename T>
static void lanes_chunk_mv(const Chunk& c) {
  constexpr int KJ = Vec::kQkKeys[MV];
  constexpr int DB = Vec::kPvDims[MV];
  int j = 0;
  for (; j + KJ <= c.n; j += KJ) lanes_qk<MV, KJ, T>(c, j);
  for (; j < c.n; ++j) lanes_qk<MV, 1, T>(c, j);
  const R ninf = Vec::set1(kNegInf);
  if (c.masked) {
    for (j = 0; j < c.n; ++j) {
      for (int v = 0; v < MV; ++v) {
        float* sj = c.s + static_cast<size_t>(j) * c.Mp + W * v;
        Vec::store(sj, Vec::keep_between(c.lo + W * v, c.hi + W * v, c.p0 + j, Vec::load(sj), ninf));
      }
    }
  }
  R alpha[MV];
  for (int v = 0; v < MV; ++v) {
    R mx = ninf;
    for (j = 0; j < c.n; ++j) mx = Vec::max(mx, Vec::load(c.s + static_cast<size_t>(j) * c.Mp + W * v));
    const R mold = Vec::load(c.m + W * v);
    const R mnew = Vec::max(mold, mx);
    // Lanes that have seen nothing yet keep max -inf, and all their scores are -inf: subtract a finite number
    // there so exp gives 0 instead of NaN (max returns its second operand, so a NaN max stays NaN).
    const R safe = Vec::max(Vec::set1(std::numeric_limits<float>::lowest()), mnew);
    alpha[v] = Vec::exp(Vec::sub(mold, safe));
    R sum = Vec::zero();
    for (j = 0; j < c.n; ++j) {
      float* sj = c.s + static_cast<size_t>(j) * c.Mp + W * v;
      const R p = Vec::exp(Vec::sub(Vec::load(sj), safe));
      Vec::store(sj, p);
      sum = Vec::add(sum, p);
    }
    Vec::store(c.l + W * v, Vec::fma(Vec::load(c.l + W * v), alpha[v], sum));
    Vec::store(c.m + W * v, mnew);
  }
  for (int d0 = 0; d0 < c.D; d0 += DB) lanes_pv<MV, DB, T>(c, d0, alpha);
}

template <typename T>
static void lanes_chunk(const Chunk& c) {
  switch (c.Mp / W) {
    case 1: lanes_chunk_mv<1, T>(c); break;
    case 2: lanes_chunk_mv<2, T>(c); break;
    case 3: lanes_chunk_mv<3, T>(c); break;
    default: lanes_chunk_mv<4, T>(c); break;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// float16 cache rows

// n rows of D float16 values -> dst [n][D] float32 (the staging buffers).
static void widen_rows(const at::Half* const* rows, float* dst, int n, int D) {
  for (int j = 0; j < n; ++j) {
    const at::Half* r = rows[j];
    float* o = dst + static_cast<size_t>(j) * D;
    for (int d = 0; d < D; d += W) Vec::store(o + d, Vec::load(r + d));
  }
}

// Rounded to float16 as this step's k/v are written (to nearest even, as narrow_scalar).
static void narrow_row(const float* src, at::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) Vec::store_half(dst + i, Vec::load(src + i));
  narrow_scalar(src + i, dst + i, n - i);
}

template <typename T>
static ChunkFn lanes_for() {  // (a template, so that a lanes form this ISA does not use is never compiled)
  if constexpr (std::is_same_v<T, float> || Vec::kLanesHalf) {
    return &lanes_chunk<T>;
  } else {
    return nullptr;
  }
}

static Kernels kernels() {
  return {&row_chunk<float>, lanes_for<float>(), &row_chunk<at::Half>, lanes_for<at::Half>(), &widen_rows,
          &narrow_row, W};
}
