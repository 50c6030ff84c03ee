// Simulator runner for the PreMoe ops: each case directory names an op and holds its arguments
// (csrc/sim/sim_io.h); the op runs through the same header entry points as the CUDA glue in
// csrc/cuda/moe_route.cu, csrc/cuda/router_stats.cu and csrc/cuda/moe_gemm.cu (TcessUpdateLaunch,
// RouterStatsLaunch, RouteTopkLaunch, MoeAlignLaunch, ExpertGemmLaunch, MoeForwardLaunch with
// MakeMoeForwardPlan), with the same
// output allocation (at::empty -> kGarbage, at::zeros -> kZero) and workspace sizes.
//
// Strided router logits: tests/sim/sim_premoe.py sends the smallest flat span of storage that
// holds the view ("router_logits", 1-D) with its sizes and strides as ints Tn, E, s0, s1.
#include <string>
#include <vector>

#include "sim_dtype.h"
#include "sim_io.h"
#include "tasksieve/expert_gemm.cuh"
#include "tasksieve/moe_route.cuh"
#include "tasksieve/router_stats.cuh"

namespace tasksieve {
namespace sim {
namespace {

// tcess_update(router_logits, top_k, r, acc, count) -> (acc, count), both updated in place.
void tcess_update(Case& c) {
  Tensor& logits = c.in("router_logits");
  Tensor& acc = c.inout("acc");
  Tensor& count = c.inout("count");
  const int64_t Tn = c.i("Tn");
  if (Tn == 0) return;  // the glue returns before the launch
  const size_t ws_bytes = TcessUpdateWorkspaceBytes(Tn, c.i("E"));
  void* ws = c.scratch(ws_bytes, Init::kGarbage);  // the glue's at::empty
  check(TcessUpdateLaunch(float_dtype(logits.dtype), logits.dev, Tn, c.i("E"), c.i("s0"),
                          c.i("s1"), c.i("top_k"), static_cast<float>(c.f("r")),
                          acc.ptr<double>(), count.ptr<int64_t>(), ws, ws_bytes, 0),
        "TcessUpdateLaunch");
}

// router_stats_update(router_logits, topk_ids, counts, logit_sum, logit_gram, coselect) ->
// the four accumulators, updated in place. topk_ids arrives contiguous (the glue's
// .contiguous()); the workspace is the glue's at::empty.
void router_stats_update(Case& c) {
  Tensor& logits = c.in("router_logits");
  Tensor& ids = c.in("topk_ids");
  Tensor& counts = c.inout("counts");
  Tensor& logit_sum = c.inout("logit_sum");
  Tensor& logit_gram = c.inout("logit_gram");
  Tensor& coselect = c.inout("coselect");
  const int64_t Tn = c.i("Tn"), E = c.i("E");
  if (Tn == 0) return;  // the glue returns before the launch
  const size_t ws_bytes = RouterStatsWorkspaceBytes(Tn, E);
  void* ws = c.scratch(ws_bytes, Init::kGarbage);
  check(RouterStatsLaunch(float_dtype(logits.dtype), ids.dtype == "i64", logits.dev, Tn, E,
                          c.i("s0"), c.i("s1"), ids.dev, ids.size(1), counts.ptr<double>(),
                          logit_sum.ptr<double>(), logit_gram.ptr<double>(),
                          coselect.ptr<double>(), ws, ws_bytes, 0),
        "RouterStatsLaunch");
}

// route_topk(...) -> (topk_weights fp32 [Tn, k], topk_ids int32 [Tn, k]), both at::empty.
void route_topk(Case& c) {
  Tensor& logits = c.in("router_logits");
  const int64_t Tn = c.i("Tn"), E = c.i("E"), k = c.i("top_k");
  Tensor& w = c.out("topk_weights", "f32", {Tn, k}, Init::kGarbage);
  Tensor& ids = c.out("topk_ids", "i32", {Tn, k}, Init::kGarbage);
  if (Tn == 0) return;
  const std::string scoring = c.s("scoring");
  moe::Scoring kind = moe::Scoring::kSoftmax;
  if (scoring == "sigmoid") kind = moe::Scoring::kSigmoid;
  else if (scoring == "topk_softmax") kind = moe::Scoring::kTopkSoftmax;
  else if (scoring != "softmax") throw std::runtime_error("route_topk: bad scoring " + scoring);
  Tensor* keep = c.opt("keep_mask");
  Tensor* bias = c.opt("bias");
  check(RouteTopkLaunch(float_dtype(logits.dtype), logits.dev, Tn, E, c.i("s0"), c.i("s1"), k,
                        kind, c.b("renormalize"), keep ? keep->ptr<bool>() : nullptr,
                        bias ? bias->ptr<float>() : nullptr, static_cast<float>(c.f("scaling")),
                        c.b("mask_full"), w.ptr<float>(), ids.ptr<int32_t>(), 0),
        "RouteTopkLaunch");
}

// moe_align(topk_ids, num_experts, block_m, expert_map) -> (sorted_ids, tile_expert,
// num_padded), all at::empty, plus an at::empty workspace.
void moe_align(Case& c) {
  Tensor& ids = c.in("topk_ids");
  Tensor* map = c.opt("expert_map");
  const int64_t E = c.i("num_experts"), bm = c.i("block_m"), S = ids.numel();
  const int64_t P = moe::align_padded_size(S, E, bm);
  Tensor& sorted = c.out("sorted_ids", "i32", {P}, Init::kGarbage);
  Tensor& tiles = c.out("tile_expert", "i32", {P / bm}, Init::kGarbage);
  Tensor& np = c.out("num_padded", "i32", {1}, Init::kGarbage);
  const size_t ws_bytes = MoeAlignWorkspaceBytes(S, E);
  void* ws = c.scratch(ws_bytes, Init::kGarbage);
  check(MoeAlignLaunch(ids.dtype == "i64", ids.dev, S, E, bm,
                       map ? map->ptr<int32_t>() : nullptr, sorted.ptr<int32_t>(),
                       tiles.ptr<int32_t>(), np.ptr<int32_t>(), ws, ws_bytes, 0),
        "MoeAlignLaunch");
}

// expert_gemm(...) -> y [S, N_out] in x's dtype, at::zeros (rows no tile lists read 0).
void expert_gemm(Case& c) {
  Tensor& x = c.in("x");
  Tensor& w = c.in("w");
  Tensor& ids = c.in("sorted_ids");
  Tensor& tiles = c.in("tile_expert");
  Tensor& np = c.in("num_padded");
  Tensor* tw = c.opt("topk_weights");  // fp32 (the caller converts, as the glue does)
  const int64_t bm = c.i("block_m"), top_k = c.i("top_k");
  const bool gather = c.b("gather"), silu = c.s("activation") == "silu_mul";
  const int64_t S = gather ? x.size(0) * top_k : x.size(0);
  const int64_t N = w.size(1), N_out = silu ? N / 2 : N, P = ids.size(0);
  Tensor& y = c.out("y", x.dtype, {S, N_out}, Init::kZero);
  if (S == 0 || N_out == 0 || P == 0) return;
  check(ExpertGemmLaunch(float_dtype(x.dtype), x.dev, w.dev, ids.ptr<int32_t>(),
                         tiles.ptr<int32_t>(), np.ptr<int32_t>(),
                         tw ? tw->ptr<float>() : nullptr, y.dev, S, x.size(1), N, w.size(0), P,
                         bm, top_k, gather, silu, 0),
        "ExpertGemmLaunch");
}

// moe_forward(x, w13, w2, topk_ids, topk_weights, expert_map) -> out [T, H] (at::empty), with
// the glue's one at::empty workspace of MakeMoeForwardPlan(...).bytes.
void moe_forward(Case& c) {
  Tensor& x = c.in("x");
  Tensor& w13 = c.in("w13");
  Tensor& w2 = c.in("w2");
  Tensor& ids = c.in("topk_ids");
  Tensor& tw = c.in("topk_weights");  // fp32
  Tensor* map = c.opt("expert_map");
  const int64_t T = x.size(0), H = x.size(1), I = w13.size(1) / 2, E_c = w13.size(0);
  const int64_t k = ids.size(1), num_experts = map ? map->size(0) : E_c;
  Tensor& out = c.out("out", x.dtype, {T, H}, Init::kGarbage);
  if (T == 0 || H == 0) return;
  const MoeForwardPlan plan =
      MakeMoeForwardPlan(T, H, I, E_c, k, num_experts, dtype_bytes(x.dtype));
  void* ws = c.scratch(plan.bytes, Init::kGarbage);
  check(MoeForwardLaunch(float_dtype(x.dtype), x.dev, w13.dev, w2.dev, ids.dtype == "i64",
                         ids.dev, tw.ptr<float>(), map ? map->ptr<int32_t>() : nullptr, out.dev,
                         T, H, I, E_c, k, num_experts, plan, ws, 0),
        "MoeForwardLaunch");
}

void dispatch(Case& c) {
  const std::string& op = c.op();
  if (op == "tcess_update") return tcess_update(c);
  if (op == "router_stats_update") return router_stats_update(c);
  if (op == "route_topk") return route_topk(c);
  if (op == "moe_align") return moe_align(c);
  if (op == "expert_gemm") return expert_gemm(c);
  if (op == "moe_forward") return moe_forward(c);
  throw std::runtime_error("sim_premoe: unknown op " + op);
}

}  // namespace
}  // namespace sim
}  // namespace tasksieve

int main(int argc, char** argv) {
  return tasksieve::sim::run_cases(argc, argv, tasksieve::sim::dispatch);
}
