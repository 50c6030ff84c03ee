// CPU implementations of the PreMoe routing ops (schemas in csrc/ops.cpp, references in
// python/tasksieve/reference.py):
//
//   tcess_update  router_logits [T, E] (fp32/fp16/bf16), acc fp64 [E] (+=), count int64 [1] (+=)
//   route_topk    router_logits [T, E] -> (topk_weights fp32 [T, k], topk_ids int32 [T, k])
//   moe_align     topk_ids int32/int64 [T, k] -> (sorted_ids int32 [P], tile_expert int32
//                 [P / block_m], num_padded int32 [1])
//
// The ranking rule and the alignment sizes come from include/tasksieve/moe_index.h, which the
// CUDA kernels share. Unlike the CUDA kernels, moe_align validates the values of topk_ids and
// expert_map (an error instead of a dropped slot).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../checks/moe_route_checks.h"
#include "tasksieve/moe_index.h"

namespace tasksieve {
namespace {

using moe::route_key;
using moe::route_key_expert;
using moe::Scoring;

// TORCH_CHECK with the "tasksieve.<op>: " prefix every message of the library carries.
#define TS_CHECK(cond, op, ...) TORCH_CHECK(cond, "tasksieve.", op, ": ", __VA_ARGS__)

// Tokens per parallel_for task: a token costs O(E log k), so small grains only pay off for
// large rows.
int64_t token_grain(int64_t E) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(E, 1)); }

template <typename T>
void row_to_float(const T* src, int64_t stride, int64_t E, float* dst) {
  for (int64_t e = 0; e < E; ++e) dst[e] = static_cast<float>(src[e * stride]);
}

// The k largest keys (distinct, 0 = not selectable) in decreasing order, as expert ids in sel;
// the caller guarantees at least k nonzero keys. keys is reordered. Small k (the routing case):
// one pass keeping a sorted top-k list, where most keys lose against its last entry with one
// compare; large k: partial_sort.
void top_keys(std::vector<uint64_t>& keys, int64_t k, int64_t* sel) {
  const int64_t E = static_cast<int64_t>(keys.size());
  if (k * 8 > E) {
    std::partial_sort(keys.begin(), keys.begin() + k, keys.end(), std::greater<uint64_t>());
  } else {
    uint64_t* top = keys.data();  // top[0, k) sorted descending, built in place from the front
    std::sort(top, top + k, std::greater<uint64_t>());
    for (int64_t e = k; e < E; ++e) {
      const uint64_t key = keys[e];
      if (key <= top[k - 1]) continue;
      int64_t i = k - 1;
      for (; i > 0 && top[i - 1] < key; --i) top[i] = top[i - 1];
      top[i] = key;
    }
  }
  for (int64_t j = 0; j < k; ++j) sel[j] = route_key_expert(keys[j]);
}

// ---------------------------------------------------------------------------------------------
// tcess_update: per-thread fp64 partial sums, combined in thread order at the end.
// ---------------------------------------------------------------------------------------------
template <typename T>
void tcess_impl(const at::Tensor& logits, int64_t top_k, float r, double* acc) {
  const int64_t Tn = logits.size(0), E = logits.size(1);
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
  const T* base = logits.const_data_ptr<T>();
  const int64_t threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads * E), 0.0);
  at::parallel_for(0, Tn, token_grain(E), [&](int64_t t0, int64_t t1) {
    double* part = partial.data() + at::get_thread_num() * E;
    std::vector<float> z(static_cast<size_t>(E));
    std::vector<uint64_t> keys(static_cast<size_t>(E));
    std::vector<int64_t> sel(static_cast<size_t>(top_k));
    std::vector<float> p(static_cast<size_t>(top_k));
    for (int64_t t = t0; t < t1; ++t) {
      row_to_float(base + t * s0, s1, E, z.data());
      for (int64_t e = 0; e < E; ++e) keys[e] = route_key(z[e], e);
      top_keys(keys, top_k, sel.data());
      float m = -INFINITY;
      for (int64_t j = 0; j < top_k; ++j) m = std::max(m, z[sel[j]]);
      float sum = 0.f;
      for (int64_t j = 0; j < top_k; ++j) sum += (p[j] = std::exp(z[sel[j]] - m));
      for (int64_t j = 0; j < top_k; ++j) {
        if (p[j] / sum >= r) part[sel[j]] += static_cast<double>(z[sel[j]]);
      }
    }
  });
  for (int64_t th = 0; th < threads; ++th)
    for (int64_t e = 0; e < E; ++e) acc[e] += partial[th * E + e];
}

void tcess_update_cpu(const at::Tensor& router_logits, int64_t top_k, double r, at::Tensor acc,
                      at::Tensor count) {
  const char* op = "tcess_update";
  checks::check_tcess_update_args(router_logits, top_k, r, acc, count);
  TS_CHECK(router_logits.device().is_cpu(), op, "router_logits must be a CPU tensor here, got ",
           router_logits.device());
  const int64_t Tn = router_logits.size(0);
  if (Tn > 0) {
    // A strided acc is summed into a contiguous copy and written back.
    at::Tensor acc_c = acc.is_contiguous() ? acc : acc.contiguous();
    double* a = acc_c.data_ptr<double>();
    const float rf = static_cast<float>(r);
    switch (router_logits.scalar_type()) {
      case at::kFloat: tcess_impl<float>(router_logits, top_k, rf, a); break;
      case at::kHalf: tcess_impl<c10::Half>(router_logits, top_k, rf, a); break;
      default: tcess_impl<c10::BFloat16>(router_logits, top_k, rf, a); break;
    }
    if (!acc.is_same(acc_c)) acc.copy_(acc_c);
  }
  *count.data_ptr<int64_t>() += Tn;
}

// ---------------------------------------------------------------------------------------------
// route_topk
// ---------------------------------------------------------------------------------------------
struct RouteArgs {
  int64_t top_k;
  Scoring scoring;
  bool renormalize, mask_full;
  const bool* keep;   // [E] or nullptr
  const float* bias;  // [E] or nullptr
  float scaling;
};

template <typename T>
void route_impl(const at::Tensor& logits, const RouteArgs& a, float* w_out, int32_t* id_out) {
  const int64_t Tn = logits.size(0), E = logits.size(1), k = a.top_k;
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
  const T* base = logits.const_data_ptr<T>();
  const bool softmax = a.scoring == Scoring::kSoftmax, sigmoid = a.scoring == Scoring::kSigmoid;
  at::parallel_for(0, Tn, token_grain(E), [&](int64_t t0, int64_t t1) {
    std::vector<float> z(static_cast<size_t>(E)), ez(static_cast<size_t>(E));
    std::vector<uint64_t> keys(static_cast<size_t>(E));
    std::vector<int64_t> sel(static_cast<size_t>(k));
    for (int64_t t = t0; t < t1; ++t) {
      row_to_float(base + t * s0, s1, E, z.data());
      // softmax: ez = exp(z - m) over the denominator set (0 elsewhere), s = ez / sum. The
      // scores s are formed only where needed: for the bias, and for the k selected.
      float sum = 1.f;
      if (softmax) {
        float m = -INFINITY;
        for (int64_t e = 0; e < E; ++e)
          if (a.mask_full || !a.keep || a.keep[e]) m = std::max(m, z[e]);
        sum = 0.f;
        for (int64_t e = 0; e < E; ++e) {
          const bool in = a.mask_full || !a.keep || a.keep[e];
          sum += (ez[e] = in ? std::exp(z[e] - m) : 0.f);
        }
      }
      auto score = [&](int64_t e) {
        return softmax ? ez[e] / sum : (sigmoid ? 1.f / (1.f + std::exp(-z[e])) : z[e]);
      };
      for (int64_t e = 0; e < E; ++e) {
        const float key = a.bias ? score(e) + a.bias[e] : z[e];
        keys[e] = (!a.keep || a.keep[e]) ? route_key(key, e) : 0;
      }
      top_keys(keys, k, sel.data());
      float* w = w_out + t * k;
      int32_t* ids = id_out + t * k;
      float norm = 1.f;  // what the weights are divided by
      if (!softmax && !sigmoid) {  // topk_softmax: softmax over the k selected logits
        float m = -INFINITY;
        for (int64_t j = 0; j < k; ++j) m = std::max(m, z[sel[j]]);
        norm = 0.f;
        for (int64_t j = 0; j < k; ++j) norm += (w[j] = std::exp(z[sel[j]] - m));
      } else {
        float wsum = 0.f;
        for (int64_t j = 0; j < k; ++j) wsum += (w[j] = score(sel[j]));
        if (a.renormalize) norm = wsum;
      }
      for (int64_t j = 0; j < k; ++j) {
        w[j] = w[j] / norm * a.scaling;
        ids[j] = static_cast<int32_t>(sel[j]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> route_topk_cpu(const at::Tensor& router_logits, int64_t top_k,
                                                  c10::string_view scoring, bool renormalize,
                                                  const std::optional<at::Tensor>& keep_mask,
                                                  const std::optional<at::Tensor>& bias,
                                                  double scaling, bool mask_full) {
  const char* op = "route_topk";
  const Scoring kind =
      checks::check_route_topk_args(router_logits, top_k, scoring, keep_mask, bias, scaling);
  TS_CHECK(router_logits.device().is_cpu(), op, "router_logits must be a CPU tensor here, got ",
           router_logits.device());
  at::Tensor keep_c, bias_c;
  if (keep_mask.has_value()) {
    checks::check_route_topk_kept(*keep_mask, top_k);
    keep_c = keep_mask->contiguous();
  }
  if (bias.has_value()) bias_c = bias->contiguous();
  const int64_t Tn = router_logits.size(0);
  at::Tensor w = at::empty({Tn, top_k}, router_logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({Tn, top_k}, router_logits.options().dtype(at::kInt));
  if (Tn == 0) return {w, ids};
  RouteArgs a;
  a.top_k = top_k;
  a.scoring = kind;
  a.renormalize = renormalize;
  a.mask_full = mask_full;
  a.keep = keep_c.defined() ? keep_c.const_data_ptr<bool>() : nullptr;
  a.bias = bias_c.defined() ? bias_c.const_data_ptr<float>() : nullptr;
  a.scaling = static_cast<float>(scaling);
  float* wp = w.data_ptr<float>();
  int32_t* ip = ids.data_ptr<int32_t>();
  switch (router_logits.scalar_type()) {
    case at::kFloat: route_impl<float>(router_logits, a, wp, ip); break;
    case at::kHalf: route_impl<c10::Half>(router_logits, a, wp, ip); break;
    default: route_impl<c10::BFloat16>(router_logits, a, wp, ip); break;
  }
  return {w, ids};
}

// ---------------------------------------------------------------------------------------------
// moe_align: a serial stable counting sort (O(T*k + E + P), memory-bound: one pass to count,
// one to scatter; threads would only contend on the per-expert cursors).
// ---------------------------------------------------------------------------------------------
template <typename Id>
void align_impl(const Id* ids, int64_t S, int64_t E, int64_t block_m, const int32_t* map,
                int32_t* sorted, int32_t* tiles, int32_t* num_padded) {
  std::vector<int64_t> cursor(static_cast<size_t>(E), 0);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t c = moe::compact_expert(static_cast<int64_t>(ids[s]), E, map);
    if (c >= 0) ++cursor[c];
  }
  int64_t offset = 0;
  for (int64_t c = 0; c < E; ++c) {
    const int64_t run = moe::align_run_length(cursor[c], block_m);
    for (int64_t t = offset / block_m; t < (offset + run) / block_m; ++t)
      tiles[t] = static_cast<int32_t>(c);
    cursor[c] = offset;
    offset += run;
  }
  *num_padded = static_cast<int32_t>(offset);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t c = moe::compact_expert(static_cast<int64_t>(ids[s]), E, map);
    if (c >= 0) sorted[cursor[c]++] = static_cast<int32_t>(s);
  }
}

// (min, max) of a non-empty contiguous integer tensor.
template <typename Id>
std::pair<int64_t, int64_t> value_range(const at::Tensor& t) {
  const Id* p = t.const_data_ptr<Id>();
  const auto [lo, hi] = std::minmax_element(p, p + t.numel());
  return {static_cast<int64_t>(*lo), static_cast<int64_t>(*hi)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_cpu(
    const at::Tensor& topk_ids, int64_t num_experts, int64_t block_m,
    const std::optional<at::Tensor>& expert_map) {
  const char* op = "moe_align";
  checks::check_moe_align_args(topk_ids, num_experts, block_m, expert_map);
  TS_CHECK(topk_ids.device().is_cpu(), op, "topk_ids must be a CPU tensor here, got ",
           topk_ids.device());
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t S = ids.numel();
  if (S > 0) {
    const auto [lo, hi] = ids.scalar_type() == at::kInt ? value_range<int32_t>(ids)
                                                        : value_range<int64_t>(ids);
    TS_CHECK(lo >= 0 && hi < num_experts, op,
             "topk_ids values must be in [0, num_experts) = [0, ", num_experts, "), got [", lo,
             ", ", hi, "]");
  }
  at::Tensor map_c;
  if (expert_map.has_value()) {
    map_c = expert_map->contiguous();
    const auto [lo, hi] = value_range<int32_t>(map_c);
    TS_CHECK(lo >= -1 && hi < num_experts, op,
             "expert_map values must be -1 or in [0, num_experts) = [0, ", num_experts,
             "), got [", lo, ", ", hi, "]");
  }
  const int64_t P = moe::align_padded_size(S, num_experts, block_m);
  auto opts = topk_ids.options().dtype(at::kInt);
  at::Tensor sorted = at::full({P}, moe::align_sentinel(topk_ids.size(0), topk_ids.size(1)), opts);
  at::Tensor tiles = at::full({P / block_m}, -1, opts);
  at::Tensor num_padded = at::empty({1}, opts);
  const int32_t* map = map_c.defined() ? map_c.const_data_ptr<int32_t>() : nullptr;
  int32_t* sp = sorted.data_ptr<int32_t>();
  int32_t* tp = tiles.data_ptr<int32_t>();
  int32_t* np = num_padded.data_ptr<int32_t>();
  if (ids.scalar_type() == at::kInt) {
    align_impl(ids.const_data_ptr<int32_t>(), S, num_experts, block_m, map, sp, tp, np);
  } else {
    align_impl(ids.const_data_ptr<int64_t>(), S, num_experts, block_m, map, sp, tp, np);
  }
  return {sorted, tiles, num_padded};
}

#undef TS_CHECK

}  // namespace
}  // namespace tasksieve

TORCH_LIBRARY_IMPL(tasksieve, CPU, m) {
  m.impl("tcess_update", &tasksieve::tcess_update_cpu);
  m.impl("route_topk", &tasksieve::route_topk_cpu);
  m.impl("moe_align", &tasksieve::moe_align_cpu);
}
