// THE list of tasksieve ops. Every schema lives here, one block per method; implementations
// register per dispatch key next to their code (csrc/cpu/*.cpp, csrc/cuda/*.cu), and fakes in
// python/tasksieve/ops.py. Conventions: index outputs are int32 and fixed-size (padded + count)
// so nothing syncs with the host; mutated arguments are marked (a!) and never returned.
#include <Python.h>
#include <torch/library.h>

// Importing tasksieve._C runs the static registrars below and in the impl files. The module
// itself is empty and uses only the limited C API, so one _C.abi3.so serves Python 3.10+.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(tasksieve, m) {
  // ---- WindowKV ---------------------------------------------------------------------------
  // q_obs [B, A, H, D] (the last A queries), k [B, N, Hk, D]; last dim contiguous, any other
  // strides (pass the HF cache [B, Hk, N, D] as k.transpose(1, 2)). Per query head: fp32 causal
  // softmax of the A queries over all N keys, summed over the queries; pooled into
  // nw = (N - A) // window windows ('max': mean of the top max(1, window/2) token scores,
  // 'mean': mean); averaged over the G = H/Hk query heads of each KV head. kv_start [B] int32
  // masks left padding (keys j < kv_start[b] get no mass). -> fp32 [B, Hk, nw]
  m.def("window_scores(Tensor q_obs, Tensor k, int window, str reduce, float? scale=None, "
        "Tensor? kv_start=None) -> Tensor");
  // scores [B, Hk, nw] fp32 -> int32 [B, Hk, min(keep, nw)]: the top windows per KV head, or
  // by the mean over heads when share (then every head gets the same row); ascending positions;
  // ties go to the lower index.
  m.def("select_windows(Tensor scores, int keep, bool share) -> Tensor");
  // kv: tensors [B, Hk, N, D_i] (K and V of every layer of a group, one launch); idx [B, Hk, keep]
  // from select_windows. Window p of the output is window idx[p] of the input (tokens
  // [idx*window, idx*window + window)), followed by the last `tail` tokens.
  // -> tensors [B, Hk, keep*window + tail, D_i]
  m.def("gather_windows(Tensor[] kv, Tensor idx, int window, int tail) -> Tensor[]");
  // Same, in place: compacts into the first keep*window + tail positions of each tensor (for a
  // preallocated cache); the caller narrows. Needs idx ascending and distinct per row.
  m.def("gather_windows_(Tensor(a!)[] kv, Tensor idx, int window, int tail) -> ()");

  // ---- FlexPrefill --------------------------------------------------------------------------
  // Layout [B, N, H, D] (flash-attn); queries are the LAST Nq of Nk positions (chunked prefill).
  // q [B, Nq, H, D], k/v [B, Nk, Hk, D] (H % Hk == 0, GQA native), Nq <= Nk; query i sits at
  // position Nk - Nq + i. Query block r = queries [r*bs, (r+1)*bs) attends to the key blocks
  // block_idx[b, h, r, :block_cnt[b, h, r]] (int32 [B, H, nbq, max_k] ascending, [B, H, nbq]);
  // causal masks keys past the query's position (only on blocks straddling the diagonal).
  // fp32 online softmax; scale default 1/sqrt(D). -> out [B, Nq, H, D] (q's dtype),
  // lse fp32 [B, H, Nq] natural log (-inf and out 0 for a row with no visible key).
  // Packed varlen (flash-attn): cu_seqlens_q, cu_seqlens_k int32 [S + 1] (both or neither;
  // 0 = c[0] <= c[1] <= ... <= c[S] = total). q [1, total_q, H, D], k/v [1, total_k, Hk, D];
  // sequence s = the dense problem above on q rows cu_q[s]..cu_q[s+1] (nq_s <= nk_s) and k/v
  // rows cu_k[s]..cu_k[s+1], with block_idx [S, H, nbq_max, max_k], block_cnt [S, H, nbq_max]
  // (nbq_max >= ceil(max nq_s / bs); rows r >= ceil(nq_s / bs) ignored; columns relative to the
  // sequence's keys). -> out [1, total_q, H, D], lse [1, H, total_q]. The CPU op validates the
  // offsets; the CUDA op cannot without a host sync and clamps them (never out of bounds).
  m.def("block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor block_idx, "
        "Tensor block_cnt, int block_size, float? scale=None, bool causal=True, "
        "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None) -> (Tensor, Tensor)");
  // Paged-KV form (chunked prefill over vLLM's paged cache): the same math and outputs, keys
  // and values read through a block table. k_cache, v_cache [num_pages, page_size, Hk, D] (same
  // shape and dtype as q's; CPU: any strides, CUDA: any but a contiguous last dim, so views of
  // vLLM's caches pass with zero copies: flash-attn [2, pages, page, Hk, D] -> cache[0], cache[1];
  // vLLM 0.32 GPU [pages, Hk, page, 2D] -> transpose + split; vLLM CPU's pages (K transposed
  // [D, page], then V rows) -> strided views, CPU only; see tasksieve.ops.paged_kv_views).
  // block_table int32 [S, max_pages]: key j of sequence s lives in
  // page block_table[s, j // page_size], row j % page_size (entries past its ceil(nk_s /
  // page_size) pages are never read); seq_lens_k int32 [S]: nk_s (context + this chunk),
  // 0 <= nk_s <= max_pages * page_size. Queries: dense q [S, Nq, H, D] (every sequence's Nq
  // queries are its last Nq positions, Nq <= nk_s), or packed q [1, total_q, H, D] with
  // cu_seqlens_q int32 [S + 1] (0 = c[0] <= ... <= c[S] = total_q; sequence s's nq_s queries
  // are rows c[s]..c[s+1], its last nq_s positions, nq_s <= nk_s). block_idx [S, H, nbq, max_k]
  // / block_cnt [S, H, nbq] as above (nbq = ceil(Nq / bs) dense, nbq_max >= ceil(max nq_s / bs)
  // packed; columns relative to the sequence's keys, block_size independent of page_size).
  // -> out in q's layout and dtype, lse fp32 [S, H, Nq] (dense) / [1, H, total_q] (packed).
  // The CPU op validates every value (used page ids in [0, num_pages), seq_lens_k, offsets,
  // index entries) and raises; the CUDA op cannot without a host sync: it clamps seq_lens_k into
  // [0, max_pages * page_size] (0 when num_pages = 0), page ids into [0, num_pages), offsets as
  // the varlen form, nq_s to nk_s, skips bad columns, and starts from out 0 / lse -inf (never an
  // out-of-bounds access; values for malformed inputs are unspecified).
  m.def("block_sparse_attention_paged(Tensor q, Tensor k_cache, Tensor v_cache, "
        "Tensor block_table, Tensor seq_lens_k, Tensor block_idx, Tensor block_cnt, "
        "int block_size, float? scale=None, bool causal=True, Tensor? cu_seqlens_q=None) -> "
        "(Tensor, Tensor)");
  // p, q [..., n] float (same shape; math fp32): Jensen-Shannon distance per row. Each row is
  // normalised to sum 1 (a row summing to 0 - fully masked - is uniform), clamped to >= eps and
  // renormalised (no 0 * log 0); D = sqrt(max(0, 1/2 sum p log(p/m) + 1/2 sum q log(q/m))),
  // m = (p + q)/2, natural log, range [0, sqrt(ln 2)]. -> fp32 [...]
  m.def("js_divergence(Tensor p, Tensor q, float eps=1e-12) -> Tensor");
  // FlexPrefill pattern estimation, fused. q [B, Nq, H, D], k [B, Nk, Hk, D] (last dim
  // contiguous), bs = block_size, nb = ceil(Nk / bs), scale default 1/sqrt(D). Representative
  // queries: the last m = min(bs, Nq); rep query r sits at position p_r = Nk - m + r.
  //   A[r, j] = fp32 causal softmax over keys j <= p_r of scale * q_r . k_j (per query head).
  //   vertical[b, h, c] = (1/m) sum_r sum_{j in key block c} A[r, j]                 (sums to 1)
  //   slash[b, h, t]    = (1/m) sum_r sum_{j : (p_r - j) // bs == t} A[r, j]         (sums to 1)
  //       t = diagonal offset block, t = 0 the main block diagonal (offset-first; the official
  //       code stores it reversed, index nb - 1 = main diagonal).
  //   estimate[b, h, c] = softmax_c(scale * qbar . kbar_c), qbar = mean of the m rep queries,
  //       kbar_c = mean of the real keys of block c (per KV head); no causal mask.
  // The [m, Nk] probabilities never reach device memory on CUDA (two passes). Nq = 0 gives
  // zeros; Nk = 0 empty outputs. CUDA: block_size in {16, 32, 64, 128}.
  // -> (vertical, slash, estimate) fp32 [B, H, nb] each
  m.def("flex_estimate(Tensor q, Tensor k, int block_size, float? scale=None) -> "
        "(Tensor, Tensor, Tensor)");
  // Paged-KV form of flex_estimate: q, k_cache, block_table, seq_lens_k, cu_seqlens_q exactly
  // as block_sparse_attention_paged (dense q [S, Nq, H, D] or packed [1, total_q, H, D] with
  // cu_seqlens_q). Sequence s is flex_estimate on its queries and its nk_s gathered keys, in
  // entries [0, nb_s) of its rows, nb_s = ceil(nk_s / bs); entries [nb_s, nb_max) are 0 in all
  // three outputs (so is a sequence without queries or keys). nb_max = ceil(max_pages *
  // page_size / bs) follows from the input sizes (no host sync; the fake is shape arithmetic).
  // Validation and CUDA clamping as block_sparse_attention_paged. CUDA: block_size in
  // {16, 32, 64, 128}. -> (vertical, slash, estimate) fp32 [S, H, nb_max] each
  m.def("flex_estimate_paged(Tensor q, Tensor k_cache, Tensor block_table, Tensor seq_lens_k, "
        "int block_size, float? scale=None, Tensor? cu_seqlens_q=None) -> "
        "(Tensor, Tensor, Tensor)");
  // FlexPrefill block selection, on the device, no host sync. q_len = Nq <= kv_len = Nk (queries
  // are the last Nq positions), bs = block_size, nb = ceil(Nk / bs) key blocks, nbq = ceil(Nq /
  // bs) query blocks; query block r = queries [r*bs, min((r+1)*bs, Nq)); its diagonal block
  // d(r) = (Nk - Nq + min((r+1)*bs, Nq) - 1) // bs (block of its last query); row r may only
  // list causal blocks c <= d(r). vertical, slash fp32 [B, H, nb] (from flex_estimate: slash[t]
  // = offset block t, 0 = main diagonal); qa_map fp32 [B, H, nbq, nb] (pooled block attention
  // map of the query-aware heads, entries c > d(r) ignored); is_query_aware bool [B, H].
  // Entries are masses >= 0 (NaN, -0 and negative entries count as 0). Ranking of a line:
  // value desc, ties to the lower (flat) index. n(x, gamma) = the fewest top entries whose
  // prefix sum (float64, in rank order) reaches gamma * (sum of all of x); gamma in (0, 1],
  // 0 <= min_blocks <= max_blocks (budgets in blocks, never converted by //128). A line whose
  // entries all count as 0 reaches gamma * 0 with its first ranked entry (n = 1).
  //   vertical-slash head: nv = min(clamp(n(vertical), min_blocks, max_blocks), nb), ns = same
  //     for slash; V = top-nv columns, S = top-ns offsets.
  //   query-aware head: V, S = top-min(min_blocks, nb) columns / offsets (skeleton), plus Q =
  //     top-n(causal entries of qa_map[b, h] flattened r*nb + c, gamma) entries (global
  //     across rows, as the paper).
  //   row r = {c <= d(r) : c == 0 or c == d(r) or c in V or d(r) - c in S or (r, c) in Q}.
  // -> block_idx int32 [B, H, nbq, nb] (row r ascending in its first block_cnt entries, 0 past
  //    them), block_cnt int32 [B, H, nbq]: the block_sparse_attention index format.
  m.def("select_blocks(Tensor vertical, Tensor slash, Tensor qa_map, Tensor is_query_aware, "
        "int q_len, int kv_len, int block_size, float gamma, int min_blocks, int max_blocks) "
        "-> (Tensor, Tensor)");

  // ---- PreMoe: routing ----------------------------------------------------------------------
  // router_logits [T, E] float (math fp32). Per token: sel = top_k experts by logit (ties to the
  // lower id); p = softmax over the k selected logits; acc[i] += z_i for every i in sel with
  // p_i >= r (r <= 0: every selected expert, the published default with top_k = 1); count += T.
  // TCESS = acc / count. acc float64 [E], count int64 [1], both mutated in place.
  m.def("tcess_update(Tensor router_logits, int top_k, float r, Tensor(a!) acc, "
        "Tensor(b!) count) -> ()");
  // UNCURL's router statistics over calibration tokens, accumulated in place in float64.
  // router_logits [T, E] float (each logit converted to fp64 before any product or sum; T = 0:
  // no-op); topk_ids int32/int64 [T, k], 1 <= k <= E, ids in [0, E). S[t, i] = #{j :
  // topk_ids[t, j] == i} (a duplicate id counts once per occurrence):
  //   counts [E]        += sum_t S[t, i]
  //   logit_sum [E]     += sum_t z[t, i]            (all tokens, selected or not)
  //   logit_gram [E, E] += sum_t z[t, i] * z[t, j]
  //   coselect [E, E]   += sum_t S[t, i] * S[t, j]  (tokens selecting both; for distinct ids
  //                                                  the diagonal adds what counts adds)
  // All four float64, contiguous, on router_logits' device. An id outside [0, E) is an error
  // on CPU; the CUDA kernel cannot check without a host sync and skips it (never an
  // out-of-bounds write). Deterministic on both (CUDA: per-chunk sums, then chunks in order).
  m.def("router_stats_update(Tensor router_logits, Tensor topk_ids, Tensor(a!) counts, "
        "Tensor(b!) logit_sum, Tensor(c!) logit_gram, Tensor(d!) coselect) -> ()");
  // router_logits [T, E] float -> (topk_weights fp32 [T, k], topk_ids int32 [T, k]), columns in
  // descending selection score, ties to the lower expert id. keep_mask bool [E] (None = all
  // kept): pruned experts can never be selected; at least top_k must be kept.
  //   scoring 'softmax': s = softmax(z) over kept experts (over all E when mask_full); select by
  //     s (+ bias); w = s; renormalize: w /= sum of the k.
  //   'sigmoid': s = sigmoid(z); select by s + bias; w = s (unbiased); renormalize as above.
  //   'topk_softmax': select by z (+ bias); w = softmax over the k selected logits.
  // then w *= scaling. bias fp32 [E] (selection only, DeepSeek-V3's e_score_correction_bias).
  m.def("route_topk(Tensor router_logits, int top_k, str scoring='softmax', "
        "bool renormalize=False, Tensor? keep_mask=None, Tensor? bias=None, float scaling=1.0, "
        "bool mask_full=False) -> (Tensor, Tensor)");
  // topk_ids int32/int64 [T, k] in [0, num_experts); slot s = t*k + j. expert_map int32
  // [num_experts] -> compact id or -1 (slot dropped); None = identity. Slots sorted by compact
  // expert (ascending), slots ascending within an expert, each expert's run padded to a multiple
  // of block_m with the sentinel T*k; experts with no slot get no tile.
  // -> sorted_ids int32 [P], P = round_up(T*k + num_experts*(block_m-1), block_m), sentinel past
  //    num_padded; tile_expert int32 [P / block_m] (compact id per tile, -1 past the used
  //    tiles); num_padded int32 [1]. On the device, no host sync.
  m.def("moe_align(Tensor topk_ids, int num_experts, int block_m, Tensor? expert_map=None) -> "
        "(Tensor, Tensor, Tensor)");

  // ---- PreMoe: expert GEMM ----------------------------------------------------------------------
  // The grouped GEMM over the tiles of moe_align. w [E_c, N, K] (out x in, contiguous). Input
  // row of slot s: x[s // top_k] of x [T, K] when gather, else x[s] of x [T*top_k, K].
  // activation 'none': y[s] = A_s . w[e]^T; 'silu_mul' (N = 2I, gate rows first, then up):
  // y[s] = silu(A_s . w[e, :I]^T) * (A_s . w[e, I:]^T). topk_weights [T, top_k] float:
  // y[s] *= topk_weights.flatten()[s] in the epilogue. fp32 accumulation.
  // -> y [T*top_k, N or I] in x's dtype; rows of slots that no tile lists are 0.
  m.def("expert_gemm(Tensor x, Tensor w, Tensor sorted_ids, Tensor tile_expert, "
        "Tensor num_padded, int block_m, int top_k, bool gather, str activation='none', "
        "Tensor? topk_weights=None) -> Tensor");
  // The whole routed-expert FFN. x [T, H], w13 [E_c, 2I, H] (gate rows, then up rows: HF v5
  // gate_up_proj), w2 [E_c, H, I], topk_ids int32/int64 [T, k], topk_weights float [T, k],
  // expert_map as moe_align (None: ids index w13 directly).
  // -> out [T, H] in x's dtype = sum_j topk_weights[t, j] * w2[e] . (silu(gate_e x) * up_e x),
  //    e = expert of slot (t, j); dropped slots add nothing.
  m.def("moe_forward(Tensor x, Tensor w13, Tensor w2, Tensor topk_ids, Tensor topk_weights, "
        "Tensor? expert_map=None) -> Tensor");
}
