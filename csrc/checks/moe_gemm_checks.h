// Argument checks of the PreMoe expert GEMM torch glue (expert_gemm, moe_forward; schemas in
// csrc/ops.cpp), shared by the CPU (csrc/cpu/moe_gemm.cpp) and CUDA (csrc/cuda/moe_gemm.cu)
// bindings so both reject the same inputs with the same messages. Torch-dependent, hence not
// under csrc/include/.
//
// Each caller checks the device kind of x first ("must be a CPU/CUDA tensor here"), then calls
// these, then adds its own dtype restriction (CUDA: float16/bfloat16). Checks of values inside
// index tensors need the data on the host, so only the CPU glue does them (check_*_values);
// the CUDA kernels skip out-of-range entries instead.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <string_view>

#include "tasksieve/expert_gemm_index.h"

namespace tasksieve {
namespace checks {

#define TS_MOE_CHECK(cond, op, ...) TORCH_CHECK(cond, "tasksieve.", op, ": ", __VA_ARGS__)

inline bool is_moe_float(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16;
}

inline void check_same_device(const char* op, const at::Tensor& ref, const char* ref_name,
                              const at::Tensor& t, const char* name) {
  TS_MOE_CHECK(t.device() == ref.device(), op, name, " must be on the device of ", ref_name,
               " (", ref.device(), "), got ", t.device());
}

// ---------------------------------------------------------------------------------------------
// expert_gemm: x [T, K] (gather) or [T*top_k, K], w [E_c, N, K], sorted_ids int32 [P],
// tile_expert int32 [P / block_m], num_padded int32 [1], topk_weights float [T, top_k].
// ---------------------------------------------------------------------------------------------

struct ExpertGemmDims {
  int64_t S;         // token slots T * top_k
  int64_t T;         // tokens
  int64_t K;         // input features
  int64_t N;         // weight rows per expert
  int64_t N_out;     // output columns: N, or N / 2 with silu_mul
  int64_t E_c;       // experts in w
  int64_t P;         // sorted_ids length
  int64_t tiles;     // P / block_m
  bool silu_mul;
};

inline ExpertGemmDims check_expert_gemm_args(const at::Tensor& x, const at::Tensor& w,
                                             const at::Tensor& sorted_ids,
                                             const at::Tensor& tile_expert,
                                             const at::Tensor& num_padded, int64_t block_m,
                                             int64_t top_k, bool gather,
                                             c10::string_view activation,
                                             const std::optional<at::Tensor>& topk_weights) {
  const char* op = "expert_gemm";
  check_same_device(op, x, "x", w, "w");
  check_same_device(op, x, "x", sorted_ids, "sorted_ids");
  check_same_device(op, x, "x", tile_expert, "tile_expert");
  check_same_device(op, x, "x", num_padded, "num_padded");
  if (topk_weights.has_value()) check_same_device(op, x, "x", *topk_weights, "topk_weights");
  TS_MOE_CHECK(is_moe_float(x.scalar_type()), op,
               "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TS_MOE_CHECK(x.dim() == 2, op, "x must be 2-D ([T, K] with gather, else [T*top_k, K]), got ",
               x.sizes());
  TS_MOE_CHECK(w.dim() == 3, op, "w must be 3-D [E_c, N, K], got ", w.sizes());
  TS_MOE_CHECK(w.scalar_type() == x.scalar_type(), op, "w must have the dtype of x (",
               x.scalar_type(), "), got ", w.scalar_type());
  const int64_t K = x.size(1), E_c = w.size(0), N = w.size(1);
  TS_MOE_CHECK(w.size(2) == K, op, "w must have shape [E_c, N, K] with K = x.size(1) = ", K,
               ", got ", w.sizes());
  TS_MOE_CHECK(E_c >= 1, op, "w must hold at least one expert (E_c >= 1), got ", w.sizes());
  TS_MOE_CHECK(top_k >= 1, op, "top_k must be >= 1, got ", top_k);
  TS_MOE_CHECK(block_m >= 1, op, "block_m must be >= 1, got ", block_m);
  const std::string_view act(activation.data(), activation.size());
  TS_MOE_CHECK(act == "none" || act == "silu_mul", op,
               "activation must be 'none' or 'silu_mul', got '", act, "'");
  const bool silu_mul = act == "silu_mul";
  TS_MOE_CHECK(!silu_mul || N % 2 == 0, op,
               "w must have an even number of rows N (gate rows, then up rows) with "
               "activation='silu_mul', got N = ", N);
  TS_MOE_CHECK(gather || x.size(0) % top_k == 0, op,
               "x must have T*top_k rows without gather (top_k = ", top_k, "), got ", x.size(0));
  const int64_t S = gather ? x.size(0) * top_k : x.size(0);
  const int64_t T = S / top_k;
  TS_MOE_CHECK(sorted_ids.scalar_type() == at::kInt && sorted_ids.dim() == 1, op,
               "sorted_ids must be a 1-D int32 tensor (moe_align's), got ",
               sorted_ids.scalar_type(), " ", sorted_ids.sizes());
  const int64_t P = sorted_ids.size(0);
  TS_MOE_CHECK(P % block_m == 0, op, "sorted_ids length must be a multiple of block_m = ",
               block_m, ", got ", P);
  TS_MOE_CHECK(tile_expert.scalar_type() == at::kInt && tile_expert.dim() == 1 &&
                   tile_expert.size(0) == P / block_m,
               op, "tile_expert must be a 1-D int32 tensor of P / block_m = ", P / block_m,
               " entries, got ", tile_expert.scalar_type(), " ", tile_expert.sizes());
  TS_MOE_CHECK(num_padded.scalar_type() == at::kInt && num_padded.numel() == 1, op,
               "num_padded must be an int32 tensor of one element, got ",
               num_padded.scalar_type(), " ", num_padded.sizes());
  if (topk_weights.has_value()) {
    const at::Tensor& tw = *topk_weights;
    TS_MOE_CHECK(is_moe_float(tw.scalar_type()), op,
                 "topk_weights must be float32, float16 or bfloat16, got ", tw.scalar_type());
    TS_MOE_CHECK(tw.dim() == 2 && tw.size(0) == T && tw.size(1) == top_k, op,
                 "topk_weights must have shape [T, top_k] = [", T, ", ", top_k, "], got ",
                 tw.sizes());
  }
  return {S, T, K, N, silu_mul ? N / 2 : N, E_c, P, P / block_m, silu_mul};
}

// Host-side values of the alignment (CPU glue and reference only): num_padded in [0, P], and in
// the tiles it covers, tile_expert in [-1, E_c) and sorted_ids in [0, S] (S = the sentinel).
inline void check_expert_gemm_values(const ExpertGemmDims& d, int64_t block_m,
                                     const int32_t* sorted_ids, const int32_t* tile_expert,
                                     int64_t num_padded) {
  const char* op = "expert_gemm";
  TS_MOE_CHECK(num_padded >= 0 && num_padded <= d.P, op, "num_padded must be in [0, P = ", d.P,
               "], got ", num_padded);
  for (int64_t t = 0; t < d.tiles && moe::tile_active(t, block_m, num_padded); ++t) {
    const int64_t e = tile_expert[t];
    TS_MOE_CHECK(e >= -1 && e < d.E_c, op, "tile_expert values must be in [-1, E_c = ", d.E_c,
                 "), got ", e, " at tile ", t);
    if (e < 0) continue;
    for (int64_t r = t * block_m; r < (t + 1) * block_m; ++r) {
      const int64_t s = sorted_ids[r];
      TS_MOE_CHECK(s >= 0 && s <= d.S, op, "sorted_ids values must be slot ids in [0, T*top_k = ",
                   d.S, "] (", d.S, " = padding), got ", s, " at position ", r);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// moe_forward: x [T, H], w13 [E_c, 2I, H], w2 [E_c, H, I], topk_ids int32/int64 [T, k],
// topk_weights float [T, k], expert_map int32 [num_experts].
// ---------------------------------------------------------------------------------------------

struct MoeForwardDims {
  int64_t T, H, I, E_c, k;
  int64_t num_experts;  // range of topk_ids: expert_map's length, else E_c
};

inline MoeForwardDims check_moe_forward_args(const at::Tensor& x, const at::Tensor& w13,
                                             const at::Tensor& w2, const at::Tensor& topk_ids,
                                             const at::Tensor& topk_weights,
                                             const std::optional<at::Tensor>& expert_map) {
  const char* op = "moe_forward";
  check_same_device(op, x, "x", w13, "w13");
  check_same_device(op, x, "x", w2, "w2");
  check_same_device(op, x, "x", topk_ids, "topk_ids");
  check_same_device(op, x, "x", topk_weights, "topk_weights");
  if (expert_map.has_value()) check_same_device(op, x, "x", *expert_map, "expert_map");
  TS_MOE_CHECK(is_moe_float(x.scalar_type()), op,
               "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TS_MOE_CHECK(x.dim() == 2, op, "x must be 2-D [T, H], got ", x.sizes());
  const int64_t T = x.size(0), H = x.size(1);
  TS_MOE_CHECK(w13.dim() == 3 && w13.size(2) == H && w13.size(1) % 2 == 0 && w13.size(1) >= 2,
               op, "w13 must have shape [E_c, 2I, H] with H = x.size(1) = ", H,
               " and I >= 1 (gate rows, then up rows), got ", w13.sizes());
  TS_MOE_CHECK(w13.scalar_type() == x.scalar_type(), op, "w13 must have the dtype of x (",
               x.scalar_type(), "), got ", w13.scalar_type());
  const int64_t E_c = w13.size(0), I = w13.size(1) / 2;
  TS_MOE_CHECK(E_c >= 1, op, "w13 must hold at least one expert (E_c >= 1), got ", w13.sizes());
  TS_MOE_CHECK(w2.dim() == 3 && w2.size(0) == E_c && w2.size(1) == H && w2.size(2) == I, op,
               "w2 must have shape [E_c, H, I] = [", E_c, ", ", H, ", ", I, "], got ",
               w2.sizes());
  TS_MOE_CHECK(w2.scalar_type() == x.scalar_type(), op, "w2 must have the dtype of x (",
               x.scalar_type(), "), got ", w2.scalar_type());
  TS_MOE_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong, op,
               "topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  TS_MOE_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == T && topk_ids.size(1) >= 1, op,
               "topk_ids must have shape [T, k] with T = x.size(0) = ", T, " and k >= 1, got ",
               topk_ids.sizes());
  const int64_t k = topk_ids.size(1);
  TS_MOE_CHECK(is_moe_float(topk_weights.scalar_type()), op,
               "topk_weights must be float32, float16 or bfloat16, got ",
               topk_weights.scalar_type());
  TS_MOE_CHECK(topk_weights.sizes() == topk_ids.sizes(), op,
               "topk_weights must have the shape of topk_ids (", topk_ids.sizes(), "), got ",
               topk_weights.sizes());
  int64_t num_experts = E_c;
  if (expert_map.has_value()) {
    const at::Tensor& m = *expert_map;
    TS_MOE_CHECK(m.scalar_type() == at::kInt && m.dim() == 1 && m.size(0) >= 1, op,
                 "expert_map must be a non-empty 1-D int32 tensor [num_experts], got ",
                 m.scalar_type(), " ", m.sizes());
    num_experts = m.size(0);
  }
  return {T, H, I, E_c, k, num_experts};
}

#undef TS_MOE_CHECK

}  // namespace checks
}  // namespace tasksieve
