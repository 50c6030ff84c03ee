// CPU implementation of router_stats_update (schema in csrc/ops.cpp, reference in
// python/tasksieve/reference/premoe.py):
//
//   router_stats_update  router_logits [T, E] (fp32/fp16/bf16), topk_ids int32/int64 [T, k];
//                        counts, logit_sum fp64 [E], logit_gram, coselect fp64 [E, E] (+=)
//
// Every id is checked before anything is updated (an error names topk_ids and the offending
// position; the CUDA kernel skips such ids instead). The integer statistics (counts, coselect)
// are counted exactly in int64; the float ones are summed in fp64 in token order, each element
// on its own (deterministic, independent of the thread count): the rows i of the Gram matrix are
// shared out between threads, each converting the logits to fp64 a block of tokens at a time and
// summing z[t, i] * z[t, j] for j >= i over its rows (the mirror j < i is the same sum of the same
// products in the same order, so the result is exactly symmetric).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../checks/router_stats_checks.h"
#include "tasksieve/router_stats_index.h"

namespace tasksieve {
namespace {

constexpr int64_t kTokenBlock = 256;  // tokens converted to fp64 at a time

// counts[i] += sum_t S[t, i]; coselect[i, j] += sum_t S[t, i] * S[t, j], counted pair by pair
// of a row's slots (a, b), a == b included: the same as S^T S, duplicates included.
template <typename Id>
void count_selections(const Id* ids, int64_t T, int64_t k, int64_t E, double* counts,
                      double* coselect) {
  std::vector<int64_t> cnt(static_cast<size_t>(E), 0), co(static_cast<size_t>(E * E), 0);
  for (int64_t t = 0; t < T; ++t) {
    const Id* row = ids + t * k;
    for (int64_t a = 0; a < k; ++a) {
      const int64_t ia = static_cast<int64_t>(row[a]);
      ++cnt[ia];
      int64_t* co_row = co.data() + ia * E;
      for (int64_t b = 0; b < k; ++b) ++co_row[static_cast<int64_t>(row[b])];
    }
  }
  for (int64_t i = 0; i < E; ++i) counts[i] += static_cast<double>(cnt[i]);
  for (int64_t x = 0; x < E * E; ++x) coselect[x] += static_cast<double>(co[x]);
}

// The row of the Gram matrix handled at position q of the parallel range: rows taken from both
// ends alternately, so that each contiguous range of q has about the same triangle work.
inline int64_t balanced_row(int64_t q, int64_t E) { return (q % 2 == 0) ? q / 2 : E - 1 - q / 2; }

// Below this many multiply-adds (T * E * E / 2) the sums run on the calling thread.
constexpr int64_t kSerialWork = int64_t{1} << 18;

template <typename T>
void sum_logits(const at::Tensor& logits, double* logit_sum, double* logit_gram) {
  const int64_t Tn = logits.size(0), E = logits.size(1);
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
  const T* base = logits.const_data_ptr<T>();
  // Running sums from 0 in token order; added to the accumulators at the end.
  std::vector<double> gram(static_cast<size_t>(E * E), 0.0), sum(static_cast<size_t>(E), 0.0);
  // One parallel region: each thread owns a set of rows q0..q1 and walks every token block,
  // converting it to fp64 itself (T*E conversions per thread against T*E*E/2 multiply-adds in
  // all), so no barrier per block.
  auto rows = [&](int64_t q0, int64_t q1) {
    std::vector<double> zb(static_cast<size_t>(std::min(Tn, kTokenBlock) * E));
    for (int64_t t0 = 0; t0 < Tn; t0 += kTokenBlock) {
      const int64_t nb = std::min(kTokenBlock, Tn - t0);
      for (int64_t t = 0; t < nb; ++t) {
        const T* src = base + (t0 + t) * s0;
        double* dst = zb.data() + t * E;
        for (int64_t e = 0; e < E; ++e)
          dst[e] = static_cast<double>(static_cast<float>(src[e * s1]));
      }
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t i = balanced_row(q, E);
        double* row = gram.data() + i * E;
        double s = sum[i];
        for (int64_t t = 0; t < nb; ++t) {
          const double* z = zb.data() + t * E;
          const double zi = z[i];
          s += zi;
          for (int64_t j = i; j < E; ++j) row[j] += zi * z[j];
        }
        sum[i] = s;
      }
    }
  };
  if (Tn * E * E / 2 < kSerialWork) {
    rows(0, E);
  } else {
    at::parallel_for(0, E, 1, rows);
  }
  for (int64_t i = 0; i < E; ++i) {
    logit_sum[i] += sum[i];
    for (int64_t j = 0; j < E; ++j)
      logit_gram[i * E + j] += j >= i ? gram[i * E + j] : gram[j * E + i];
  }
}

template <typename Id>
void router_stats_ids(const at::Tensor& ids, int64_t E, double* counts, double* coselect) {
  const Id* p = ids.const_data_ptr<Id>();
  count_selections(p, ids.size(0), ids.size(1), E, counts, coselect);
}

void router_stats_update_cpu(const at::Tensor& router_logits, const at::Tensor& topk_ids,
                             at::Tensor counts, at::Tensor logit_sum, at::Tensor logit_gram,
                             at::Tensor coselect) {
  checks::check_router_stats_update_args(router_logits, topk_ids, counts, logit_sum, logit_gram,
                                         coselect);
  TORCH_CHECK(router_logits.device().is_cpu(),
              "tasksieve.router_stats_update: router_logits must be a CPU tensor here, got ",
              router_logits.device());
  const int64_t Tn = router_logits.size(0), E = router_logits.size(1);
  if (Tn == 0) return;
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t k = ids.size(1);
  const bool ids64 = ids.scalar_type() == at::kLong;
  // Every id first: nothing is updated when one is out of range.
  if (ids64) {
    checks::check_router_stats_ids(ids.const_data_ptr<int64_t>(), Tn, k, E);
  } else {
    checks::check_router_stats_ids(ids.const_data_ptr<int32_t>(), Tn, k, E);
  }
  switch (router_logits.scalar_type()) {
    case at::kFloat:
      sum_logits<float>(router_logits, logit_sum.data_ptr<double>(), logit_gram.data_ptr<double>());
      break;
    case at::kHalf:
      sum_logits<c10::Half>(router_logits, logit_sum.data_ptr<double>(),
                            logit_gram.data_ptr<double>());
      break;
    default:
      sum_logits<c10::BFloat16>(router_logits, logit_sum.data_ptr<double>(),
                                logit_gram.data_ptr<double>());
      break;
  }
  if (ids64) {
    router_stats_ids<int64_t>(ids, E, counts.data_ptr<double>(), coselect.data_ptr<double>());
  } else {
    router_stats_ids<int32_t>(ids, E, counts.data_ptr<double>(), coselect.data_ptr<double>());
  }
}

}  // namespace
}  // namespace tasksieve

TORCH_LIBRARY_IMPL(tasksieve, CPU, m) {
  m.impl("router_stats_update", &tasksieve::router_stats_update_cpu);
}
