// Simulator runner for the FlexPrefill ops: each case directory names an op and holds its
// arguments (csrc/sim/sim_io.h); the op runs through the same header launcher as the CUDA glue
// in csrc/cuda/flexprefill_*.cu, with the same output allocation. The Python side
// (tests/sim/sim_flexprefill.py) does the glue's conversions (fp64 -> fp32, contiguity, the
// default scale) before the tensors reach this program, so every tensor here is contiguous.
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "sim_dtype.h"
#include "sim_io.h"
#include "tasksieve/block_sparse_attention.cuh"
#include "tasksieve/flex_estimate.cuh"
#include "tasksieve/flex_index.h"
#include "tasksieve/js_divergence.cuh"
#include "tasksieve/select_blocks.cuh"

namespace tasksieve {
namespace sim {
namespace {

// js_divergence(p, q, eps) -> fp32 [...]; the glue casts fp64 to fp32 first (the caller does).
void js_divergence(Case& c) {
  Tensor& p = c.in("p");
  Tensor& q = c.in("q");
  std::vector<int64_t> shape = p.shape;
  const int64_t n = shape.back();
  shape.pop_back();
  Tensor& out = c.out("out", "f32", shape, Init::kGarbage);
  const int64_t rows = out.numel();
  if (rows == 0) return;
  check(JsDivergenceLaunch(float_dtype(p.dtype), p.dev, q.dev, out.ptr<float>(), rows, n,
                           static_cast<float>(c.f("eps")), 0),
        "JsDivergenceLaunch");
}

// flex_estimate(q [B, Nq, H, D], k [B, Nk, Hk, D], block_size, scale) -> (vertical, slash,
// estimate) fp32 [B, H, nb] (at::empty); workspace at::empty bytes. `scale` arrives resolved.
void flex_estimate(Case& c) {
  Tensor& q = c.in("q");
  Tensor& k = c.in("k");
  const int64_t B = q.size(0), Nq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Nk = k.size(1), Hk = k.size(2);
  const int64_t bs = c.i("block_size");
  const int64_t nb = flex::num_blocks(Nk, bs);
  Tensor& vert = c.out("vertical", "f32", {B, H, nb}, Init::kGarbage);
  Tensor& slash = c.out("slash", "f32", {B, H, nb}, Init::kGarbage);
  Tensor& est = c.out("estimate", "f32", {B, H, nb}, Init::kGarbage);
  if (vert.numel() == 0) return;
  const size_t ws_bytes = FlexEstimateWorkspaceBytes(B, Nq, H, Hk, Nk, D, bs);
  void* ws = c.scratch(ws_bytes, Init::kGarbage);
  check(FlexEstimateLaunch(float_dtype(q.dtype), q.dev, k.dev, vert.ptr<float>(),
                           slash.ptr<float>(), est.ptr<float>(), ws, ws_bytes, B, Nq, H, Hk, Nk,
                           D, bs, Nq * H * D, H * D, D, Nk * Hk * D, Hk * D, D,
                           static_cast<float>(c.f("scale")), 0),
        "FlexEstimateLaunch");
}

// select_blocks(...) -> (block_idx int32 [B, H, nbq, nb], block_cnt int32 [B, H, nbq]), both
// at::empty; the glue zero-fills block_cnt when block_idx is empty.
void select_blocks(Case& c) {
  Tensor& v = c.in("vertical");
  Tensor& s = c.in("slash");
  Tensor& m = c.in("qa_map");
  Tensor& qa = c.in("is_query_aware");
  const int64_t B = v.size(0), H = v.size(1), nb = v.size(2);
  const int64_t q_len = c.i("q_len"), kv_len = c.i("kv_len"), bs = c.i("block_size");
  const int64_t nbq = flex::num_blocks(q_len, bs);
  const bool empty = B * H * nbq * nb == 0;
  Tensor& idx = c.out("block_idx", "i32", {B, H, nbq, nb}, Init::kGarbage);
  Tensor& cnt = c.out("block_cnt", "i32", {B, H, nbq}, empty ? Init::kZero : Init::kGarbage);
  if (empty) return;
  check(SelectBlocks<float>(v.ptr<float>(), s.ptr<float>(), m.ptr<float>(), qa.ptr<bool>(),
                            idx.ptr<int32_t>(), cnt.ptr<int32_t>(), B * H, q_len, kv_len, bs,
                            c.f("gamma"), c.i("min_blocks"), c.i("max_blocks"), 0),
        "SelectBlocks");
}

// block_sparse_attention(q, k, v, block_idx, block_cnt, block_size, scale, causal,
// cu_seqlens_q, cu_seqlens_k) -> (out [B, Nq, H, D] dtype of q, lse fp32 [B, H, Nq]).
// Dense: both at::empty. Varlen: out at::zeros, lse at::full(-inf). `scale` arrives resolved.
void block_sparse_attention(Case& c) {
  Tensor& q = c.in("q");
  Tensor& k = c.in("k");
  Tensor& v = c.in("v");
  Tensor& idx = c.in("block_idx");
  Tensor& cnt = c.in("block_cnt");
  Tensor* cu_q = c.opt("cu_seqlens_q");
  Tensor* cu_k = c.opt("cu_seqlens_k");
  const int64_t B = q.size(0), Nq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Nk = k.size(1), Hk = k.size(2);
  const int64_t bs = c.i("block_size");
  const float scale = static_cast<float>(c.f("scale"));
  const bool causal = c.b("causal");
  const DType dt = float_dtype(q.dtype);
  const bool varlen = cu_q != nullptr;
  Tensor& out = c.out("out", q.dtype, {B, Nq, H, D}, varlen ? Init::kZero : Init::kGarbage);
  Tensor& lse = c.out("lse", "f32", {B, H, Nq}, Init::kGarbage);
  if (varlen) {
    if (lse.numel() > 0) {  // at::full(-inf)
      std::vector<float> host(lse.numel(), -std::numeric_limits<float>::infinity());
      check(cudaMemcpy(lse.dev, host.data(), lse.bytes(), cudaMemcpyHostToDevice), "lse fill");
    }
    const int64_t S = cu_q->numel() - 1;
    if (Nq == 0 || H == 0 || S == 0) return;
    check(BlockSparseAttentionVarlenLaunch(
              dt, q.dev, k.dev, v.dev, idx.ptr<int32_t>(), cnt.ptr<int32_t>(),
              cu_q->ptr<int32_t>(), cu_k->ptr<int32_t>(), out.dev, lse.ptr<float>(), idx.size(0),
              Nq, Nk, H, Hk, D, idx.size(3), idx.size(2), bs, H * D, D, Hk * D, D, Hk * D, D,
              scale, causal, 0),
          "BlockSparseAttentionVarlenLaunch");
    return;
  }
  if (B == 0 || Nq == 0 || H == 0) return;
  check(BlockSparseAttentionLaunch(dt, q.dev, k.dev, v.dev, idx.ptr<int32_t>(),
                                   cnt.ptr<int32_t>(), out.dev, lse.ptr<float>(), B, Nq, Nk, H,
                                   Hk, D, idx.size(3), bs, Nq * H * D, H * D, D, Nk * Hk * D,
                                   Hk * D, D, Nk * Hk * D, Hk * D, D, scale, causal, 0),
        "BlockSparseAttentionLaunch");
}

// The paged caches arrive as one flat tensor `cache` (the storage the caller's views share)
// plus element offsets and strides, so the kernels read the same strided layout as on a card.
const void* at_offset(const Tensor& buf, int64_t elems) {
  return static_cast<const char*>(buf.dev) + elems * static_cast<int64_t>(dtype_bytes(buf.dtype));
}

// block_sparse_attention_paged(q, k_cache, v_cache, block_table, seq_lens_k, block_idx,
// block_cnt, block_size, scale, causal, cu_seqlens_q) -> (out, lse): out at::zeros, lse
// at::full(-inf), as the glue. Caches: `cache` + k_offset / v_offset, num_pages, page_size, Hk
// and the page / row / head strides k_sp, k_sn, k_sh, v_sp, v_sn, v_sh.
void block_sparse_attention_paged(Case& c) {
  Tensor& q = c.in("q");
  Tensor& cache = c.in("cache");
  Tensor& bt = c.in("block_table");
  Tensor& sl = c.in("seq_lens_k");
  Tensor& idx = c.in("block_idx");
  Tensor& cnt = c.in("block_cnt");
  Tensor* cu_q = c.opt("cu_seqlens_q");
  const int64_t B = q.size(0), Nq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t S = bt.size(0), max_pages = bt.size(1);
  Tensor& out = c.out("out", q.dtype, {B, Nq, H, D}, Init::kZero);
  Tensor& lse = c.out("lse", "f32", {B, H, Nq}, Init::kGarbage);
  if (lse.numel() > 0) {  // at::full(-inf)
    std::vector<float> host(lse.numel(), -std::numeric_limits<float>::infinity());
    check(cudaMemcpy(lse.dev, host.data(), lse.bytes(), cudaMemcpyHostToDevice), "lse fill");
  }
  const int64_t nbq = idx.size(2);
  if (Nq == 0 || H == 0 || S == 0 || nbq == 0) return;
  check(BlockSparseAttentionPagedLaunch(
            float_dtype(q.dtype), q.dev, at_offset(cache, c.i("k_offset")),
            at_offset(cache, c.i("v_offset")), bt.ptr<int32_t>(), sl.ptr<int32_t>(),
            cu_q != nullptr ? cu_q->ptr<int32_t>() : nullptr, idx.ptr<int32_t>(),
            cnt.ptr<int32_t>(), out.dev, lse.ptr<float>(), S, Nq, H, c.i("Hk"), D,
            c.i("num_pages"), c.i("page_size"), max_pages, idx.size(3), nbq, c.i("block_size"),
            Nq * H * D, H * D, D, c.i("k_sp"), c.i("k_sn"), c.i("k_sh"), c.i("v_sp"), c.i("v_sn"),
            c.i("v_sh"), static_cast<float>(c.f("scale")), c.b("causal"), 0),
        "BlockSparseAttentionPagedLaunch");
}

// flex_estimate_paged(q, k_cache, block_table, seq_lens_k, block_size, scale, cu_seqlens_q) ->
// (vertical, slash, estimate) fp32 [S, H, nb_max] (at::empty); workspace at::empty bytes.
void flex_estimate_paged(Case& c) {
  Tensor& q = c.in("q");
  Tensor& cache = c.in("cache");
  Tensor& bt = c.in("block_table");
  Tensor& sl = c.in("seq_lens_k");
  Tensor* cu_q = c.opt("cu_seqlens_q");
  const int64_t Nq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t S = bt.size(0), max_pages = bt.size(1);
  const int64_t bs = c.i("block_size"), page_size = c.i("page_size"), Hk = c.i("Hk");
  const int64_t nb_max = flex::num_blocks(max_pages * page_size, bs);
  Tensor& vert = c.out("vertical", "f32", {S, H, nb_max}, Init::kGarbage);
  Tensor& slash = c.out("slash", "f32", {S, H, nb_max}, Init::kGarbage);
  Tensor& est = c.out("estimate", "f32", {S, H, nb_max}, Init::kGarbage);
  if (vert.numel() == 0) return;
  const size_t ws_bytes =
      FlexEstimatePagedWorkspaceBytes(S, Nq, H, Hk, D, max_pages, page_size, bs);
  void* ws = c.scratch(ws_bytes, Init::kGarbage);
  check(FlexEstimatePagedLaunch(float_dtype(q.dtype), q.dev, at_offset(cache, c.i("k_offset")),
                                bt.ptr<int32_t>(), sl.ptr<int32_t>(),
                                cu_q != nullptr ? cu_q->ptr<int32_t>() : nullptr,
                                vert.ptr<float>(), slash.ptr<float>(), est.ptr<float>(), ws,
                                ws_bytes, S, Nq, H, Hk, D, c.i("num_pages"), page_size, max_pages,
                                bs, Nq * H * D, H * D, D, c.i("k_sp"), c.i("k_sn"), c.i("k_sh"),
                                static_cast<float>(c.f("scale")), 0),
        "FlexEstimatePagedLaunch");
}

void dispatch(Case& c) {
  const std::string& op = c.op();
  if (op == "js_divergence") return js_divergence(c);
  if (op == "flex_estimate") return flex_estimate(c);
  if (op == "select_blocks") return select_blocks(c);
  if (op == "block_sparse_attention") return block_sparse_attention(c);
  if (op == "block_sparse_attention_paged") return block_sparse_attention_paged(c);
  if (op == "flex_estimate_paged") return flex_estimate_paged(c);
  throw std::runtime_error("sim_flexprefill: unknown op " + op);
}

}  // namespace
}  // namespace sim
}  // namespace tasksieve

int main(int argc, char** argv) { return tasksieve::sim::run_cases(argc, argv, tasksieve::sim::dispatch); }
