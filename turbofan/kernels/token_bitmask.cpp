// Constrained decoding: applying a grammar's token bitmask to a step's logits (turbofan/engine/constraints.py).
// One pass per row straight from the packed bits (bit set = allowed), instead of unpacking them into a bool
// tensor and masking it: most words of a constrained row are all-banned or all-allowed, and those take one fill
// or nothing. Also counts each row's allowed tokens (popcount), which the sampler uses to narrow top-k.
namespace turbofan::mask {

// logits [B, V] float32 (rows contiguous); bitmask [N, W] int32 with W >= ceil(V / 32), row j for logits row
// rows[j]; bits past V are ignored. In place: banned logits become -inf. Returns the allowed counts [N] int64.
at::Tensor apply_token_bitmask(at::Tensor logits, const at::Tensor& bitmask, const at::Tensor& rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "apply_token_bitmask: logits must be a float32 [B, V] tensor with contiguous rows");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == at::kInt && bitmask.stride(1) == 1,
              "apply_token_bitmask: bitmask must be an int32 [N, W] tensor with contiguous rows");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(),
              "apply_token_bitmask: rows must be a 1-D int64 tensor");
  const int64_t n = rows.size(0), vocab = logits.size(1), words = (vocab + 31) / 32;
  TORCH_CHECK(bitmask.size(0) >= n && bitmask.size(1) >= words, "apply_token_bitmask: the bitmask is too small");
  const int64_t* row_of = rows.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j)
    TORCH_CHECK(row_of[j] >= 0 && row_of[j] < logits.size(0), "apply_token_bitmask: row out of range");
  auto counts = at::empty({n}, at::kLong);
  float* out = logits.data_ptr<float>();
  const auto* bits = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>());
  int64_t* count = counts.data_ptr<int64_t>();
  const int64_t lstride = logits.stride(0), bstride = bitmask.stride(0);
  const float ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      float* row = out + row_of[j] * lstride;
      const uint32_t* m = bits + j * bstride;
      int64_t allowed = 0;
      for (int64_t w = 0; w < words; ++w) {
        const int64_t base = w * 32, width = std::min<int64_t>(32, vocab - base);
        uint32_t word = m[w];
        if (width < 32) word &= (1u << width) - 1u;
        allowed += __builtin_popcount(word);
        if (word == 0) {
          std::fill(row + base, row + base + width, ninf);
        } else if (word != 0xFFFFFFFFu) {
          for (int64_t k = 0; k < width; ++k)
            if (!((word >> k) & 1u)) row[base + k] = ninf;
        }
      }
      count[j] = allowed;
    }
  });
  return counts;
}

}  // namespace turbofan::mask

TORCH_LIBRARY_FRAGMENT(turbofan, m) {
  m.def("apply_token_bitmask(Tensor(a!) logits, Tensor bitmask, Tensor rows) -> Tensor");
}
TORCH_LIBRARY_IMPL(turbofan, CPU, m) { m.impl("apply_token_bitmask", &turbofan::mask::apply_token_bitmask); }
