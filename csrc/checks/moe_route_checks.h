// Argument checks of the PreMoe routing ops (tcess_update, route_topk, moe_align; schemas in
// csrc/ops.cpp), shared by the CPU (csrc/cpu/moe_route.cpp) and CUDA (csrc/cuda/moe_route.cu)
// bindings so both reject the same inputs with the same messages as python/tasksieve/reference.py.
// Torch-dependent, hence not under csrc/include/.
//
// Values inside tensors are checked only where the contract needs it: route_topk counts the kept
// experts of keep_mask (one host read, also on CUDA, skipped while a CUDA graph is captured);
// the CPU moe_align validates topk_ids and expert_map values, the CUDA kernel drops bad slots.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string_view>

#include "tasksieve/moe_index.h"

namespace tasksieve {
namespace checks {

// TORCH_CHECK with the "tasksieve.<op>: " prefix every message of the library carries.
#define TS_MOE_CHECK(cond, op, ...) TORCH_CHECK(cond, "tasksieve.", op, ": ", __VA_ARGS__)

constexpr int64_t kInt32Max = 2147483647;

// router_logits [T, E] fp32/fp16/bf16 and 1 <= top_k <= E.
inline void check_router_logits(const char* op, const at::Tensor& logits, int64_t top_k) {
  TS_MOE_CHECK(logits.dim() == 2, op, "router_logits must be a 2-D tensor [T, E], got shape ",
               logits.sizes());
  const auto dt = logits.scalar_type();
  TS_MOE_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
               "router_logits must be float32, float16 or bfloat16, got ", dt);
  const int64_t E = logits.size(1);
  TS_MOE_CHECK(top_k >= 1 && top_k <= E, op, "top_k must be in [1, E] = [1, ", E,
               "] (E = router_logits.size(1)), got ", top_k);
}

// A per-expert vector [E] of `dtype` (spelled `dtype_name` as torch does) on the device of `ref`.
inline void check_expert_vector(const char* op, const char* name, const at::Tensor& t,
                                at::ScalarType dtype, const char* dtype_name, int64_t E,
                                const at::Tensor& ref, const char* ref_name = "router_logits") {
  TS_MOE_CHECK(t.dim() == 1 && t.size(0) == E, op, name, " must be a 1-D tensor [", E,
               "], got shape ", t.sizes());
  TS_MOE_CHECK(t.scalar_type() == dtype, op, name, " must be ", dtype_name, ", got ",
               t.scalar_type());
  TS_MOE_CHECK(t.device() == ref.device(), op, name, " must be on the device of ", ref_name, " (",
               ref.device(), "), got ", t.device());
}

inline void check_tcess_update_args(const at::Tensor& logits, int64_t top_k, double r,
                                    const at::Tensor& acc, const at::Tensor& count) {
  const char* op = "tcess_update";
  check_router_logits(op, logits, top_k);
  TS_MOE_CHECK(!std::isnan(r), op, "r must be a number, got ", r);
  check_expert_vector(op, "acc", acc, at::kDouble, "torch.float64", logits.size(1), logits);
  TS_MOE_CHECK(count.dim() == 1 && count.size(0) == 1, op,
               "count must be a tensor of shape [1], got shape ", count.sizes());
  TS_MOE_CHECK(count.scalar_type() == at::kLong, op, "count must be int64, got ",
               count.scalar_type());
  TS_MOE_CHECK(count.device() == logits.device(), op,
               "count must be on the device of router_logits (", logits.device(), "), got ",
               count.device());
}

// Everything but the kept count (see check_route_topk_kept); returns the scoring.
inline moe::Scoring check_route_topk_args(const at::Tensor& logits, int64_t top_k,
                                          c10::string_view scoring,
                                          const std::optional<at::Tensor>& keep_mask,
                                          const std::optional<at::Tensor>& bias, double scaling) {
  const char* op = "route_topk";
  check_router_logits(op, logits, top_k);
  const std::string_view s(scoring.data(), scoring.size());
  moe::Scoring kind = moe::Scoring::kSoftmax;
  if (s == "sigmoid") {
    kind = moe::Scoring::kSigmoid;
  } else if (s == "topk_softmax") {
    kind = moe::Scoring::kTopkSoftmax;
  } else {
    TS_MOE_CHECK(s == "softmax", op,
                 "scoring must be one of 'softmax', 'sigmoid', 'topk_softmax', got '", s, "'");
  }
  TS_MOE_CHECK(std::isfinite(scaling), op, "scaling must be finite, got ", scaling);
  const int64_t E = logits.size(1);
  if (bias.has_value()) {
    check_expert_vector(op, "bias", *bias, at::kFloat, "torch.float32", E, logits);
  }
  if (keep_mask.has_value()) {
    check_expert_vector(op, "keep_mask", *keep_mask, at::kBool, "torch.bool", E, logits);
  }
  return kind;
}

// At least top_k experts kept. Reads keep_mask (a host sync for a CUDA mask).
inline void check_route_topk_kept(const at::Tensor& keep_mask, int64_t top_k) {
  const int64_t kept = keep_mask.sum().item<int64_t>();
  TS_MOE_CHECK(kept >= top_k, "route_topk", "keep_mask must keep at least top_k = ", top_k,
               " experts, got ", kept, " kept");
}

// Shapes, dtypes, devices and sizes of moe_align's arguments (not the values).
inline void check_moe_align_args(const at::Tensor& topk_ids, int64_t num_experts, int64_t block_m,
                                 const std::optional<at::Tensor>& expert_map) {
  const char* op = "moe_align";
  TS_MOE_CHECK(topk_ids.dim() == 2, op, "topk_ids must be a 2-D tensor [T, k], got shape ",
               topk_ids.sizes());
  const auto dt = topk_ids.scalar_type();
  TS_MOE_CHECK(dt == at::kInt || dt == at::kLong, op, "topk_ids must be int32 or int64, got ", dt);
  TS_MOE_CHECK(num_experts >= 1, op, "num_experts must be >= 1, got ", num_experts);
  TS_MOE_CHECK(block_m >= 1, op, "block_m must be >= 1, got ", block_m);
  const int64_t T = topk_ids.size(0), k = topk_ids.size(1);
  TS_MOE_CHECK(k >= 1, op, "topk_ids must have at least one column (k >= 1), got shape ",
               topk_ids.sizes());
  // Bounded before multiplying so the size arithmetic itself cannot overflow.
  const bool small = T <= kInt32Max && num_experts <= kInt32Max && block_m <= kInt32Max;
  const int64_t P = small ? moe::align_padded_size(T * k, num_experts, block_m) : -1;
  TS_MOE_CHECK(small && P <= kInt32Max, op, "the padded size P = ", P, " (T*k = ", T * k,
               ", num_experts = ", num_experts, ", block_m = ", block_m, ") must fit in int32");
  if (expert_map.has_value()) {
    check_expert_vector(op, "expert_map", *expert_map, at::kInt, "int32", num_experts,
                        topk_ids, "topk_ids");
  }
}

#undef TS_MOE_CHECK

}  // namespace checks
}  // namespace tasksieve
