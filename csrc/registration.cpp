// The one registry of the squeeze op library: every schema lives here, kernels register
// their implementations per dispatch key in csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu, or (Triton)
// from squeeze_ops/_library.py. Conventions (see README): int32 indices, lengths and page ids,
// fp32 scores and statistics; mutated arguments are marked (x!) and never returned.
#include <torch/library.h>

TORCH_LIBRARY(squeeze, m) {
  // ---- layer dimension: importance measured in the attention epilogue ----
  m.def("add_rmsnorm_cossim(Tensor(a!) residual, Tensor attn_out, Tensor weight, Tensor cu_seqlens, "
        "Tensor(b!) cos_sum, float eps) -> Tensor");
  m.def("add_cossim(Tensor(a!) residual, Tensor attn_out, Tensor cu_seqlens, Tensor(b!) cos_sum) -> ()");
  m.def("kmeans1d(Tensor x, int k) -> (Tensor labels, Tensor centroids)");
  m.def("layer_budgets(Tensor sim, Tensor base, float p, int k, int min_budget, Tensor? max_budget) "
        "-> (Tensor budgets, Tensor labels, Tensor centroids)");

  // ---- prefill: attention with H2O / observation-window column scores, prompt compression ----
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float scale, "
        "int score_queries) -> (Tensor out, Tensor lse, Tensor scores)");
  m.def("compress_kv_(Tensor k, Tensor v, Tensor scores, Tensor cu_seqlens, Tensor budget, str policy, "
        "int sinks, float recent_ratio, int pool_size, str pool_mode, Tensor(a!) k_pages, Tensor(b!) v_pages, "
        "Tensor(c!) pos_pages, Tensor(d!) score_pages, Tensor block_table, Tensor(e!) lens) -> ()");

  // ---- decode: paged rows (sequence, layer, KV head), in-place H2O accumulation and eviction ----
  m.def("decode_attention(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, Tensor lens, float scale, "
        "Tensor(a!)? score_pages) -> Tensor");
  m.def("cache_append_(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) pos_pages, Tensor(d!) score_pages, "
        "Tensor block_table, Tensor(e!) lens, Tensor k_new, Tensor v_new, Tensor pos) -> ()");
  m.def("cache_evict_(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) pos_pages, Tensor(d!) score_pages, "
        "Tensor block_table, Tensor(e!) lens, Tensor budget, str policy, int sinks, float recent_ratio) -> ()");
  m.def("decode_step_(Tensor q, Tensor k_new, Tensor v_new, Tensor pos, Tensor(a!) k_pages, Tensor(b!) v_pages, "
        "Tensor(c!) pos_pages, Tensor(d!) score_pages, Tensor block_table, Tensor(e!) lens, Tensor budget, "
        "float scale, str policy, int sinks, float recent_ratio, bool accumulate_scores) -> Tensor");
}
