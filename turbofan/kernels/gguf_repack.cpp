// GGUF quantized rows -> the q4/q8 panel layout of quant_matmul.cpp, in one pass and without a float32 tensor.
// Reference: turbofan/model/gguf_repack.py (numpy + gguf-py's dequantizers + kernels/quant.py `quantize`); the
// tests require the same bytes from both. Float values are formed in the same operation order as gguf-py, and
// the build has -ffp-contract=off, so re-quantized blocks round exactly as the reference does.
// Direct (codes carried over): Q4_0 / Q4_1 / Q4_K -> q4, Q8_0 -> q8. Re-quantized to q8 from the row's float values:
// F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K. Anything else is the Python path's job.
namespace turbofan {
namespace repack {

enum GgmlType : int64_t {
  kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14,
  kBF16 = 30
};

static inline float h2f(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

static inline uint16_t f2h_bits(float x) { return c10::Half(x).x; }

// Q4_K / Q5_K: 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes (ggml's get_scale_min_k4).
static inline void scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
  }
}

// One row's values as float32, as gguf-py's dequantize_blocks computes them.
static void dequantize_row(int64_t type, const uint8_t* src, float* out, int64_t k) {
  switch (type) {
    case kF32:
      std::memcpy(out, src, k * 4);
      return;
    case kF16:
      for (int64_t i = 0; i < k; ++i) out[i] = h2f(src + 2 * i);
      return;
    case kBF16:
      for (int64_t i = 0; i < k; ++i) {
        uint32_t bits = static_cast<uint32_t>(src[2 * i] | (src[2 * i + 1] << 8)) << 16;
        std::memcpy(out + i, &bits, 4);
      }
      return;
    case kQ4_0:
      for (int64_t b = 0; b < k / 32; ++b, src += 18, out += 32) {
        float d = h2f(src);
        for (int j = 0; j < 16; ++j) {
          out[j] = d * static_cast<float>(static_cast<int8_t>(src[2 + j] & 0xF) - 8);
          out[j + 16] = d * static_cast<float>(static_cast<int8_t>(src[2 + j] >> 4) - 8);
        }
      }
      return;
    case kQ4_1:
      for (int64_t b = 0; b < k / 32; ++b, src += 20, out += 32) {
        float d = h2f(src), m = h2f(src + 2);
        for (int j = 0; j < 16; ++j) {
          out[j] = d * static_cast<float>(src[4 + j] & 0xF) + m;
          out[j + 16] = d * static_cast<float>(src[4 + j] >> 4) + m;
        }
      }
      return;
    case kQ5_0:
    case kQ5_1: {
      const bool q51 = type == kQ5_1;
      const int step = q51 ? 24 : 22, off = q51 ? 4 : 2;
      for (int64_t b = 0; b < k / 32; ++b, src += step, out += 32) {
        float d = h2f(src), m = q51 ? h2f(src + 2) : 0.0f;
        uint32_t qh;
        std::memcpy(&qh, src + off, 4);
        const uint8_t* qs = src + off + 4;
        for (int j = 0; j < 32; ++j) {
          int lo = j < 16 ? (qs[j] & 0xF) : (qs[j - 16] >> 4);
          int q = lo | (((qh >> j) & 1) << 4);
          out[j] = q51 ? d * static_cast<float>(q) + m : d * static_cast<float>(static_cast<int8_t>(q - 16));
        }
      }
      return;
    }
    case kQ8_0:
      for (int64_t b = 0; b < k / 32; ++b, src += 34, out += 32) {
        float d = h2f(src);
        for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(static_cast<int8_t>(src[2 + j]));
      }
      return;
    case kQ4_K:
    case kQ5_K: {
      const bool q5 = type == kQ5_K;
      const int step = q5 ? 176 : 144;
      for (int64_t b = 0; b < k / 256; ++b, src += step, out += 256) {
        float d = h2f(src), dmin = h2f(src + 2);
        const uint8_t* scales = src + 4;
        const uint8_t* qh = src + 16;
        const uint8_t* qs = q5 ? src + 48 : src + 16;
        for (int s = 0; s < 8; ++s) {
          uint8_t sc, m;
          scale_min_k4(s, scales, &sc, &m);
          float ds = d * static_cast<float>(sc), dm = dmin * static_cast<float>(m);
          for (int l = 0; l < 32; ++l) {
            int q = (qs[32 * (s / 2) + l] >> (4 * (s % 2))) & 0xF;
            if (q5) q |= ((qh[l] >> s) & 1) << 4;
            out[32 * s + l] = ds * static_cast<float>(q) - dm;
          }
        }
      }
      return;
    }
    case kQ6_K:
      for (int64_t b = 0; b < k / 256; ++b, src += 210, out += 256) {
        const int8_t* sc = reinterpret_cast<const int8_t*>(src + 192);
        float d = h2f(src + 208);
        for (int h = 0; h < 2; ++h) {
          const uint8_t* ql = src + 64 * h;
          const uint8_t* qh = src + 128 + 32 * h;
          for (int s = 0; s < 4; ++s) {  // 32 weights: low nibbles of ql[0..63] for s < 2, high ones after
            const uint8_t* lo = ql + 32 * (s % 2);
            const int shift = 4 * (s / 2);
            float* o = out + 128 * h + 32 * s;
            for (int half = 0; half < 2; ++half) {
              float ds = d * static_cast<float>(sc[8 * h + 2 * s + half]);
              for (int l = 16 * half; l < 16 * half + 16; ++l) {
                int q = ((lo[l] >> shift) & 0xF) | (((qh[l] >> (2 * s)) & 3) << 4);
                o[l] = ds * static_cast<float>(q - 32);
              }
            }
          }
        }
      }
      return;
    default:
      TORCH_CHECK(false, "gguf_repack: ggml type ", type, " is not decoded here");
  }
}

// The 4-bit codes of one row (Q4_0 / Q4_1 / Q4_K) with each block-of-32's float16 scale and min.
static void q4_codes_row(int64_t type, const uint8_t* src, int64_t k, uint8_t* codes, uint16_t* scales,
                         uint16_t* mins) {
  if (type == kQ4_K) {
    for (int64_t b = 0; b < k / 256; ++b, src += 144) {
      float d = h2f(src), dmin = h2f(src + 2);
      for (int s = 0; s < 8; ++s) {
        uint8_t sc, m;
        scale_min_k4(s, src + 4, &sc, &m);
        int64_t blk = b * 8 + s;
        scales[blk] = f2h_bits(d * static_cast<float>(sc));
        mins[blk] = f2h_bits(-(dmin * static_cast<float>(m)));
        for (int l = 0; l < 32; ++l) codes[blk * 32 + l] = (src[16 + 32 * (s / 2) + l] >> (4 * (s % 2))) & 0xF;
      }
    }
    return;
  }
  const bool q41 = type == kQ4_1;
  const int step = q41 ? 20 : 18, off = q41 ? 4 : 2;
  for (int64_t b = 0; b < k / 32; ++b, src += step) {
    float d = h2f(src);
    scales[b] = f2h_bits(d);
    mins[b] = q41 ? static_cast<uint16_t>(src[2] | (src[3] << 8)) : f2h_bits(d * -8.0f);
    for (int j = 0; j < 16; ++j) {
      codes[b * 32 + j] = src[off + j] & 0xF;
      codes[b * 32 + j + 16] = src[off + j] >> 4;
    }
  }
}

// q8 codes of one row's float values: kernels/quant.py `quantize(w, 8)` block by block.
static void q8_codes_row(const float* x, int64_t k, int8_t* codes, uint16_t* scales, int32_t* wsum) {
  for (int64_t b = 0; b < k / 32; ++b) {
    const float* v = x + b * 32;
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j]));
    uint16_t h = f2h_bits(amax / 127.0f);
    float d = static_cast<float>(c10::Half(h, c10::Half::from_bits()));
    int32_t sum = 0;
    const float div = std::max(d, 1e-30f);
    for (int j = 0; j < 32; ++j) {
      // round half to even as nearbyint does (|x| < 2^22 here), without a libm call: the build has no ISA flags
      float x = d > 0 ? v[j] / div : 0.0f;
      float q = (x + 12582912.0f) - 12582912.0f;
      int8_t c = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
      codes[b * 32 + j] = c;
      sum += c;
    }
    scales[b] = h;
    wsum[b] = sum;
  }
}

static int64_t row_bytes(int64_t type, int64_t k) {
  switch (type) {
    case kF32: return k * 4;
    case kF16: case kBF16: return k * 2;
    case kQ4_0: return k / 32 * 18;
    case kQ4_1: return k / 32 * 20;
    case kQ5_0: return k / 32 * 22;
    case kQ5_1: return k / 32 * 24;
    case kQ8_0: return k / 32 * 34;
    case kQ4_K: return k / 256 * 144;
    case kQ5_K: return k / 256 * 176;
    case kQ6_K: return k / 256 * 210;
    default: return -1;
  }
}

// Q4_K rows -> q4k: the codes in q4's nibble layout, the 6-bit sub-block scales and mins as bytes, the super-block
// d and dmin as stored (kernels/quant.py "q4k").
static void q4k_panel(const uint8_t* src, int64_t stride, int64_t nb, uint8_t* qw, uint8_t* sc, uint8_t* mn,
                      uint16_t* sup) {
  std::vector<uint8_t> codes(nb * 32);
  for (int r = 0; r < 16; ++r) {
    const uint8_t* row = src + r * stride;
    for (int64_t sb = 0; sb < nb / 8; ++sb) {
      const uint8_t* blk = row + sb * 144;
      sup[sb * 32 + r] = static_cast<uint16_t>(blk[0] | (blk[1] << 8));
      sup[sb * 32 + 16 + r] = static_cast<uint16_t>(blk[2] | (blk[3] << 8));
      for (int s = 0; s < 8; ++s) {
        uint8_t scale, min;
        scale_min_k4(s, blk + 4, &scale, &min);
        const int64_t b = sb * 8 + s;
        sc[b * 16 + r] = scale;
        mn[b * 16 + r] = min;
        for (int l = 0; l < 32; ++l) codes[b * 32 + l] = (blk[16 + 32 * (s / 2) + l] >> (4 * (s % 2))) & 0xF;
      }
    }
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* c = codes.data() + b * 32;
      uint8_t* dst = qw + b * 256 + r * 4;
      for (int j = 0; j < 4; ++j)
        for (int e = 0; e < 4; ++e) dst[j * 64 + e] = c[4 * j + e] | (c[4 * (j + 4) + e] << 4);
    }
  }
}

// Q6_K rows -> q6k: codes 0..63 as q4's nibble planes plus a plane of their top two bits (byte (row, e) of plane h
// holds quads 4h..4h+3's bits at 2t), the int8 scales per 16, the super-block d as stored.
static void q6k_panel(const uint8_t* src, int64_t stride, int64_t nb, uint8_t* qw, int8_t* sc, uint16_t* sup) {
  std::vector<uint8_t> codes(nb * 32);
  for (int r = 0; r < 16; ++r) {
    const uint8_t* row = src + r * stride;
    for (int64_t sb = 0; sb < nb / 8; ++sb) {
      const uint8_t* blk = row + sb * 210;
      sup[sb * 16 + r] = static_cast<uint16_t>(blk[208] | (blk[209] << 8));
      const int8_t* scales = reinterpret_cast<const int8_t*>(blk + 192);
      for (int j = 0; j < 8; ++j) {
        sc[(sb * 8 + j) * 32 + r] = scales[2 * j];
        sc[(sb * 8 + j) * 32 + 16 + r] = scales[2 * j + 1];
      }
      for (int i = 0; i < 256; ++i) {
        const int h = i / 128, j = i % 128;
        const int lo = j < 64 ? (blk[64 * h + j] & 0xF) : (blk[64 * h + j - 64] >> 4);
        const int hi = (blk[128 + 32 * h + j % 32] >> (2 * (j / 32))) & 3;
        codes[sb * 256 + i] = static_cast<uint8_t>(lo | (hi << 4));
      }
    }
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* c = codes.data() + b * 32;
      uint8_t* dst = qw + b * 384 + r * 4;
      for (int j = 0; j < 4; ++j)
        for (int e = 0; e < 4; ++e) dst[j * 64 + e] = (c[4 * j + e] & 0xF) | ((c[4 * (j + 4) + e] & 0xF) << 4);
      for (int h = 0; h < 2; ++h)
        for (int e = 0; e < 4; ++e) {
          uint8_t bits = 0;
          for (int t = 0; t < 4; ++t) bits |= ((c[4 * (4 * h + t) + e] >> 4) & 3) << (2 * t);
          dst[256 + h * 64 + e] = bits;
        }
    }
  }
}

// raw: uint8 [N, row bytes] of ggml type `type`, rows of K weights -> (qweight, scales, mins, wsum) in the panel
// layout of kernels/quant.py (`pack` for q4/q8; the K formats as described in quant_matmul.cpp). fmt: "q4" (from
// Q4_0/Q4_1/Q4_K), "q8" (from any decoded type), "q4k" (from Q4_K), "q6k" (from Q6_K). Unused slots are empty.
std::vector<at::Tensor> gguf_repack(const at::Tensor& raw, int64_t type, int64_t k, c10::string_view fmt) {
  TORCH_CHECK(raw.dim() == 2 && raw.scalar_type() == at::kByte && raw.is_contiguous(), "raw must be uint8 [N, bytes]");
  const int64_t n = raw.size(0), nb = k / 32, panels = n / 16;
  TORCH_CHECK(n % 16 == 0 && k % 32 == 0, "gguf_repack needs N % 16 == 0 and K % 32 == 0");
  TORCH_CHECK(row_bytes(type, k) == raw.size(1), "gguf_repack: ggml type ", type, " rows of ", k,
              " weights are not ", raw.size(1), " bytes");
  const bool q4k = fmt == "q4k", q6k = fmt == "q6k";
  const int64_t bits = fmt == "q4" ? 4 : fmt == "q8" ? 8 : 0;
  TORCH_CHECK(!q4k || type == kQ4_K, "gguf_repack: q4k is made from Q4_K only");
  TORCH_CHECK(!q6k || type == kQ6_K, "gguf_repack: q6k is made from Q6_K only");
  const bool direct4 = bits == 4 && (type == kQ4_0 || type == kQ4_1 || type == kQ4_K);
  TORCH_CHECK(q4k || q6k || direct4 || bits == 8, "gguf_repack: q4 is made from Q4_0, Q4_1 and Q4_K only");
  auto opts = at::TensorOptions().dtype(at::kByte);
  const uint8_t* src = raw.data_ptr<uint8_t>();
  const int64_t stride = raw.size(1);
  if (q4k || q6k) {
    at::Tensor qweight = at::empty({panels, nb * (q6k ? 384 : 256)}, opts);
    at::Tensor scales = at::empty({panels, nb * (q6k ? 32 : 16)}, opts.dtype(q6k ? at::kChar : at::kByte));
    at::Tensor mins = q6k ? at::empty({0}, opts) : at::empty({panels, nb * 16}, opts);
    at::Tensor supers = at::empty({panels, nb / 8 * (q6k ? 16 : 32)}, opts.dtype(at::kHalf));
    uint8_t* qw = qweight.data_ptr<uint8_t>();
    uint16_t* sup = reinterpret_cast<uint16_t*>(supers.data_ptr());
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        if (q6k)
          q6k_panel(src + p * 16 * stride, stride, nb, qw + p * nb * 384, scales.data_ptr<int8_t>() + p * nb * 32,
                    sup + p * (nb / 8) * 16);
        else
          q4k_panel(src + p * 16 * stride, stride, nb, qw + p * nb * 256, scales.data_ptr<uint8_t>() + p * nb * 16,
                    mins.data_ptr<uint8_t>() + p * nb * 16, sup + p * (nb / 8) * 32);
      }
    });
    return {qweight, scales, mins, supers};
  }
  at::Tensor qweight = at::empty({panels, nb * (bits == 4 ? 256 : 512)}, bits == 4 ? opts : opts.dtype(at::kChar));
  at::Tensor scales = at::empty({panels, nb * 16}, opts.dtype(at::kHalf));
  at::Tensor mins = bits == 4 ? at::empty({panels, nb * 16}, opts.dtype(at::kHalf)) : at::empty({0}, opts.dtype(at::kHalf));
  at::Tensor wsum = bits == 8 ? at::empty({panels, nb * 16}, opts.dtype(at::kInt)) : at::empty({0}, opts.dtype(at::kInt));
  uint8_t* qw = reinterpret_cast<uint8_t*>(qweight.data_ptr());
  uint16_t* sc = reinterpret_cast<uint16_t*>(scales.data_ptr());
  uint16_t* mn = bits == 4 ? reinterpret_cast<uint16_t*>(mins.data_ptr()) : nullptr;
  int32_t* ws = bits == 8 ? wsum.data_ptr<int32_t>() : nullptr;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> values(k);
    std::vector<uint8_t> codes(k);
    std::vector<uint16_t> s(nb), m(nb);
    std::vector<int32_t> w(nb);
    for (int64_t p = p0; p < p1; ++p) {
      for (int r = 0; r < 16; ++r) {
        const uint8_t* row = src + (p * 16 + r) * stride;
        if (direct4) {
          q4_codes_row(type, row, k, codes.data(), s.data(), m.data());
        } else if (type == kQ8_0 && bits == 8) {
          bool clean = true;  // codes carried over unless a block uses -128 (then the float way, as the reference)
          for (int64_t b = 0; b < nb && clean; ++b)
            for (int j = 0; j < 32; ++j) clean &= row[b * 34 + 2 + j] != 0x80;
          if (clean) {
            for (int64_t b = 0; b < nb; ++b) {
              int32_t sum = 0;
              for (int j = 0; j < 32; ++j) {
                int8_t c = static_cast<int8_t>(row[b * 34 + 2 + j]);
                codes[b * 32 + j] = static_cast<uint8_t>(c);
                sum += c;
              }
              s[b] = static_cast<uint16_t>(row[b * 34] | (row[b * 34 + 1] << 8));
              w[b] = sum;
            }
          } else {
            dequantize_row(type, row, values.data(), k);
            q8_codes_row(values.data(), k, reinterpret_cast<int8_t*>(codes.data()), s.data(), w.data());
          }
        } else {
          dequantize_row(type, row, values.data(), k);
          q8_codes_row(values.data(), k, reinterpret_cast<int8_t*>(codes.data()), s.data(), w.data());
        }
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* c = codes.data() + b * 32;
          sc[p * nb * 16 + b * 16 + r] = s[b];
          if (bits == 4) {
            mn[p * nb * 16 + b * 16 + r] = m[b];
            uint8_t* dst = qw + p * nb * 256 + b * 256 + r * 4;
            for (int j = 0; j < 4; ++j)
              for (int e = 0; e < 4; ++e) dst[j * 64 + e] = c[4 * j + e] | (c[4 * (j + 4) + e] << 4);
          } else {
            ws[p * nb * 16 + b * 16 + r] = w[b];
            uint8_t* dst = qw + p * nb * 512 + b * 512 + r * 4;
            for (int j = 0; j < 8; ++j)
              for (int e = 0; e < 4; ++e) dst[j * 64 + e] = c[4 * j + e];
          }
        }
      }
    }
  });
  return {qweight, scales, mins, wsum};
}

// raw: uint8 [N, row bytes] of ggml type `type` -> float32 [N, K], the values gguf-py's dequantizers give.
at::Tensor gguf_dequantize(const at::Tensor& raw, int64_t type, int64_t k) {
  TORCH_CHECK(raw.dim() == 2 && raw.scalar_type() == at::kByte && raw.is_contiguous(), "raw must be uint8 [N, bytes]");
  TORCH_CHECK(row_bytes(type, k) == raw.size(1), "gguf_dequantize: ggml type ", type, " rows of ", k,
              " weights are not ", raw.size(1), " bytes");
  const int64_t n = raw.size(0), stride = raw.size(1);
  at::Tensor out = at::empty({n, k}, at::TensorOptions().dtype(at::kFloat));
  const uint8_t* src = raw.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) dequantize_row(type, src + r * stride, dst + r * k, k);
  });
  return out;
}

}  // namespace repack
}  // namespace turbofan

TORCH_LIBRARY_FRAGMENT(turbofan, m) {
  m.def("gguf_repack(Tensor raw, int type, int k, str fmt) -> Tensor[]", &turbofan::repack::gguf_repack);
  m.def("gguf_dequantize(Tensor raw, int type, int k) -> Tensor", &turbofan::repack::gguf_dequantize);
}
