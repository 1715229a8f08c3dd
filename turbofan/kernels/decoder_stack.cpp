// The decoder layers of a model as one call: the same kernels the Python layer calls (rms_norm, qlinear or
// at::linear, qkv_rope, paged_attention_varlen, add_rms_norm, gated_act), in the same order with the same
// arguments, so the results are the same bytes; only the ~10 dispatcher round trips and the Python between them
// per layer are gone. At batch 1 those cost about as much as reading the weights of the small projections.
//
// A DecoderStack is built once per model (turbofan/model/layers.py) and holds every layer's weights in kSlots
// slots; an absent weight (no bias, no q/k norm, no sandwich norm) is an empty tensor. A linear is four slots:
// a float weight (then at::linear), or the packed codes, scales, mins (4-bit) and wsum (8-bit) of qlinear.
namespace turbofan::stack {

enum Slot : int64_t {
  kInputNorm = 0,
  kQkv = 1,        // 4 slots, then its bias
  kQkvBias = 5,
  kQNorm = 6,
  kKNorm = 7,
  kO = 8,          // 4 slots
  kPostAttnNorm = 12,
  kPreMlpNorm = 13,
  kGateUp = 14,    // 4 slots
  kDown = 18,      // 4 slots
  kPostMlpNorm = 22,
  kSlots = 23,
};

static inline bool present(const at::Tensor& t) { return t.defined() && t.numel() > 0; }
static inline c10::optional<at::Tensor> opt(const at::Tensor& t) {
  return present(t) ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// Each kernel call is a profiler scope under the name its dispatcher op has (torch.profiler, /debug/profile):
// the calls skip the dispatcher, not the time per operation a person profiles. Free while no profiler runs.
#define TF_SCOPE(name) RECORD_FUNCTION(name, std::vector<c10::IValue>())

// x @ W^T (+ bias) for the linear in slots w[0..3].
static at::Tensor linear(const at::Tensor& x, const at::Tensor* w, const at::Tensor& bias) {
  if (!present(w[1])) return at::linear(x, w[0], opt(bias));
  TF_SCOPE("turbofan::qlinear");
  return qmm::qlinear(x, w[0], w[1], opt(w[2]), opt(w[3]), opt(bias));
}

static at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TF_SCOPE("turbofan::rms_norm");
  return fused::rms_norm(x, w, eps);
}

struct DecoderStack : torch::CustomClassHolder {
  std::vector<at::Tensor> weights;      // kSlots per layer
  std::vector<int64_t> windows;         // per layer; 0 = full attention
  std::vector<int64_t> rope_of_layer;   // index into forward's cos/sin lists
  int64_t heads, kv_heads;
  double eps, scale;
  bool gelu;

  DecoderStack(std::vector<at::Tensor> weights_, std::vector<int64_t> windows_, std::vector<int64_t> rope_of_layer_,
               int64_t heads_, int64_t kv_heads_, double eps_, double scale_, bool gelu_)
      : weights(std::move(weights_)), windows(std::move(windows_)), rope_of_layer(std::move(rope_of_layer_)),
        heads(heads_), kv_heads(kv_heads_), eps(eps_), scale(scale_), gelu(gelu_) {
    const int64_t layers = static_cast<int64_t>(windows.size());
    TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * kSlots, "DecoderStack: expected ", layers * kSlots,
                " weights for ", layers, " layers, got ", weights.size());
    TORCH_CHECK(static_cast<int64_t>(rope_of_layer.size()) == layers, "DecoderStack: one rope index per layer");
  }

  // x [T, hidden] through every layer; kv_cache [layers, 2, slots, kv_heads, head_dim] is written in place.
  at::Tensor forward(at::Tensor x, std::vector<at::Tensor> cos, std::vector<at::Tensor> sin, at::Tensor kv_cache,
                     at::Tensor slot_mapping, at::Tensor block_tables, at::Tensor query_start_loc,
                     at::Tensor context_lens, int64_t block_size, c10::optional<at::Tensor> prompt_lens) {
    const int64_t layers = static_cast<int64_t>(windows.size());
    TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == layers, "DecoderStack: kv_cache must be [", layers,
                ", 2, slots, kv_heads, head_dim]");
    const int64_t t = x.size(0);
    const at::Tensor none;
    TF_SCOPE("turbofan::decoder_stack");
    for (int64_t i = 0; i < layers; ++i) {
      const at::Tensor* w = weights.data() + i * kSlots;
      const int64_t r = rope_of_layer[i];
      at::Tensor h = rms_norm(x, w[kInputNorm], eps);
      at::Tensor qkv = linear(h, w + kQkv, w[kQkvBias]);
      at::Tensor q, k, v, o;
      {
        TF_SCOPE("turbofan::qkv_rope");
        std::tie(q, k, v) = fused::qkv_rope(qkv, cos[r], sin[r], heads, kv_heads, opt(w[kQNorm]), opt(w[kKNorm]), eps);
      }
      {
        TF_SCOPE("turbofan::paged_attention_varlen");
        const at::Tensor layer_cache = kv_cache.select(0, i);
        o = attn::paged_attention_varlen(q, k, v, layer_cache.select(0, 0), layer_cache.select(0, 1), slot_mapping,
                                         block_tables, query_start_loc, context_lens, block_size, scale, windows[i],
                                         prompt_lens);
      }
      o = linear(o.reshape({t, q.size(1) * q.size(2)}), w + kO, none);
      if (present(w[kPostAttnNorm])) o = rms_norm(o, w[kPostAttnNorm], eps);
      at::Tensor residual, normed, gated;
      {
        TF_SCOPE("turbofan::add_rms_norm");
        std::tie(residual, normed) = fused::add_rms_norm(x, o, w[kPreMlpNorm], eps);
      }
      at::Tensor gate_up = linear(normed, w + kGateUp, none);
      {
        TF_SCOPE("turbofan::gated_act");
        gated = fused::gated_act(gate_up, gelu);
      }
      at::Tensor m = linear(gated, w + kDown, none);
      if (present(w[kPostMlpNorm])) m = rms_norm(m, w[kPostMlpNorm], eps);
      x = residual + m;
    }
    return x;
  }
};

}  // namespace turbofan::stack

TORCH_LIBRARY_FRAGMENT(turbofan, m) {
  m.class_<turbofan::stack::DecoderStack>("DecoderStack")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<int64_t>, int64_t, int64_t, double,
                       double, bool>())
      .def("forward", &turbofan::stack::DecoderStack::forward);
}
