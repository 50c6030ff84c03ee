// Argument checks of router_stats_update (schema in csrc/ops.cpp), shared by the CPU
// (csrc/cpu/router_stats.cpp) and CUDA (csrc/cuda/router_stats.cu) bindings so both reject the
// same inputs with the same messages as python/tasksieve/reference/premoe.py
// (check_router_stats_update_args). Torch-dependent, hence not under csrc/include/.
//
// Only shapes, dtypes, devices and layouts are checked here. The values of topk_ids are checked
// by the CPU op alone (check_router_stats_ids, before anything is updated); the CUDA kernel
// skips ids outside [0, E), since checking them would need a host sync.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "tasksieve/router_stats_index.h"

namespace tasksieve {
namespace checks {

// TORCH_CHECK with the "tasksieve.<op>: " prefix every message of the library carries.
#define TS_RS_CHECK(cond, ...) \
  TORCH_CHECK(cond, "tasksieve.router_stats_update: ", __VA_ARGS__)

// One float64 accumulator: exactly `shape`, contiguous (updated in place through a raw
// pointer), on the device of router_logits. `shape_name` spells the shape ("[E]", "[E, E]").
inline void check_router_stats_accumulator(const char* name, const at::Tensor& t,
                                           const std::vector<int64_t>& shape,
                                           const char* shape_name, const at::Tensor& logits) {
  TS_RS_CHECK(t.sizes().vec() == shape, name, " must have shape ", shape_name, " = ",
              c10::IntArrayRef(shape), " (E = router_logits.size(1)), got ", t.sizes());
  TS_RS_CHECK(t.scalar_type() == at::kDouble, name, " must be torch.float64, got ",
              t.scalar_type());
  TS_RS_CHECK(t.device() == logits.device(), name, " must be on the device of router_logits (",
              logits.device(), "), got ", t.device());
  TS_RS_CHECK(t.is_contiguous(), name, " must be contiguous (it is updated in place), got strides ",
              t.strides());
}

inline void check_router_stats_update_args(const at::Tensor& logits, const at::Tensor& topk_ids,
                                           const at::Tensor& counts, const at::Tensor& logit_sum,
                                           const at::Tensor& logit_gram,
                                           const at::Tensor& coselect) {
  TS_RS_CHECK(logits.dim() == 2, "router_logits must be a 2-D tensor [T, E], got shape ",
              logits.sizes());
  const auto dt = logits.scalar_type();
  TS_RS_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "router_logits must be float32, float16 or bfloat16, got ", dt);
  const int64_t T = logits.size(0), E = logits.size(1);
  TS_RS_CHECK(topk_ids.dim() == 2, "topk_ids must be a 2-D tensor [T, k], got shape ",
              topk_ids.sizes());
  const auto it = topk_ids.scalar_type();
  TS_RS_CHECK(it == at::kInt || it == at::kLong, "topk_ids must be int32 or int64, got ", it);
  TS_RS_CHECK(topk_ids.size(0) == T, "topk_ids must have T = router_logits.size(0) = ", T,
              " rows, got shape ", topk_ids.sizes());
  const int64_t k = topk_ids.size(1);
  TS_RS_CHECK(k >= 1 && k <= E, "topk_ids must have k in [1, E] = [1, ", E,
              "] columns (E = router_logits.size(1)), got k = ", k);
  TS_RS_CHECK(topk_ids.device() == logits.device(),
              "topk_ids must be on the device of router_logits (", logits.device(), "), got ",
              topk_ids.device());
  check_router_stats_accumulator("counts", counts, {E}, "[E]", logits);
  check_router_stats_accumulator("logit_sum", logit_sum, {E}, "[E]", logits);
  check_router_stats_accumulator("logit_gram", logit_gram, {E, E}, "[E, E]", logits);
  check_router_stats_accumulator("coselect", coselect, {E, E}, "[E, E]", logits);
}

// Every id of a contiguous CPU topk_ids [T, k] in [0, E) (the CPU op only).
template <typename Id>
inline void check_router_stats_ids(const Id* ids, int64_t T, int64_t k, int64_t E) {
  for (int64_t s = 0; s < T * k; ++s) {
    const int64_t id = static_cast<int64_t>(ids[s]);
    TS_RS_CHECK(moe::rs_id_valid(id, E), "topk_ids must be in [0, E) = [0, ", E, "), got ", id,
                " at [", s / k, ", ", s % k, "]");
  }
}

#undef TS_RS_CHECK

}  // namespace checks
}  // namespace tasksieve
