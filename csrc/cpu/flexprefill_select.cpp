// CPU implementation of the FlexPrefill block selection op (schema in csrc/ops.cpp, reference
// in python/tasksieve/reference.py):
//
//   select_blocks  vertical, slash [B, H, nb], qa_map [B, H, nbq, nb] (fp32), is_query_aware
//                  bool [B, H] -> (block_idx int32 [B, H, nbq, nb], block_cnt int32 [B, H, nbq])
//
// Per (b, h) (at::parallel_for): each line (vertical, slash, the causal entries of qa_map) is
// ranked by a full sort of its ranking keys (select_index.h: value desc, ties to the lower flat
// index) and its sorted prefix sums are accumulated in float64, in sorted order, exactly as the
// reference does with torch.sort + torch.cumsum(float64). Then every row is a scan of its causal
// columns. The index math (diagonal block, keys) is shared with the CUDA kernel.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../checks/flexprefill_checks.h"
#include "tasksieve/flex_index.h"
#include "tasksieve/select_index.h"

namespace tasksieve {
namespace {

constexpr uint64_t kNone = ~0ull;

struct Entry {
  uint64_t key;
  float value;
};

// Threshold key of the top n entries of `e` (n = clamp(n_mass, lo, hi) when by_mass, else lo;
// n_mass = fewest sorted entries whose float64 prefix sum reaches gamma * (sum of all), all of
// them if it is never reached). Sorts `e` by key descending. kNone selects nothing.
uint64_t top_threshold(std::vector<Entry>& e, bool by_mass, double gamma, int64_t lo,
                       int64_t hi) {
  std::sort(e.begin(), e.end(), [](const Entry& a, const Entry& b) { return a.key > b.key; });
  const int64_t n_all = static_cast<int64_t>(e.size());
  int64_t n = lo;
  if (by_mass) {
    std::vector<double> c(e.size());
    double acc = 0.0;
    for (size_t i = 0; i < e.size(); ++i) c[i] = (acc += static_cast<double>(e[i].value));
    n = n_all;
    if (n_all > 0) {
      const double target = gamma * c.back();
      for (int64_t i = 0; i < n_all; ++i)
        if (c[i] >= target) {
          n = i + 1;
          break;
        }
    }
    n = std::min(std::max(n, lo), hi);
  }
  n = std::min(n, n_all);
  return n <= 0 ? kNone : e[n - 1].key;
}

std::tuple<at::Tensor, at::Tensor> select_blocks_cpu(const at::Tensor& vertical,
                                                     const at::Tensor& slash,
                                                     const at::Tensor& qa_map,
                                                     const at::Tensor& is_query_aware,
                                                     int64_t q_len, int64_t kv_len,
                                                     int64_t block_size, double gamma,
                                                     int64_t min_blocks, int64_t max_blocks) {
  TORCH_CHECK(vertical.device().is_cpu(),
              "tasksieve.select_blocks: vertical must be a CPU tensor here, got ",
              vertical.device());
  const checks::SelectBlocksDims dims = checks::check_select_blocks_args(
      vertical, slash, qa_map, is_query_aware, q_len, kv_len, block_size, gamma, min_blocks,
      max_blocks);
  const int64_t B = dims.B, H = dims.H, nb = dims.nb, nbq = dims.nbq;

  auto iopts = vertical.options().dtype(at::kInt);
  at::Tensor idx = at::empty({B, H, nbq, nb}, iopts);
  at::Tensor cnt = at::empty({B, H, nbq}, iopts);
  if (idx.numel() == 0) {
    cnt.zero_();
    return {idx, cnt};
  }
  const at::Tensor vc = vertical.contiguous(), sc = slash.contiguous(),
                   mc = qa_map.contiguous(), qc = is_query_aware.contiguous();
  const float* v = vc.const_data_ptr<float>();
  const float* s = sc.const_data_ptr<float>();
  const float* mp = mc.const_data_ptr<float>();
  const bool* qa = qc.const_data_ptr<bool>();
  int32_t* oi = idx.data_ptr<int32_t>();
  int32_t* oc = cnt.data_ptr<int32_t>();
  const int64_t Nq = q_len, Nk = kv_len, bs = block_size;

  at::parallel_for(0, B * H, 1, [&](int64_t w0, int64_t w1) {
    std::vector<Entry> e;
    for (int64_t w = w0; w < w1; ++w) {
      const bool is_qa = qa[w];
      const float* vr = v + w * nb;
      const float* sr = s + w * nb;
      const float* mr = mp + w * nbq * nb;
      auto line = [&](const float* x) {
        e.resize(nb);
        for (int64_t i = 0; i < nb; ++i)
          e[i] = Entry{flex::sel_key(x[i], i), flex::sel_value(x[i])};
        return top_threshold(e, !is_qa, gamma, min_blocks, max_blocks);
      };
      const uint64_t kv = line(vr);
      const uint64_t ks = line(sr);
      uint64_t km = kNone;
      if (is_qa) {
        e.clear();
        for (int64_t r = 0; r < nbq; ++r) {
          const int64_t d = flex::diag_block(r, Nq, Nk, bs);
          for (int64_t c = 0; c <= d; ++c)
            e.push_back(Entry{flex::sel_key(mr[r * nb + c], r * nb + c),
                              flex::sel_value(mr[r * nb + c])});
        }
        km = top_threshold(e, true, gamma, 0, INT64_MAX);
      }
      for (int64_t r = 0; r < nbq; ++r) {
        const int64_t d = flex::diag_block(r, Nq, Nk, bs);
        int32_t* out = oi + (w * nbq + r) * nb;
        int64_t n = 0;
        for (int64_t c = 0; c <= d; ++c) {
          const bool sel = c == 0 || c == d || flex::sel_key(vr[c], c) >= kv ||
                           flex::sel_key(sr[d - c], d - c) >= ks ||
                           (is_qa && flex::sel_key(mr[r * nb + c], r * nb + c) >= km);
          if (sel) out[n++] = static_cast<int32_t>(c);
        }
        oc[w * nbq + r] = static_cast<int32_t>(n);
        std::fill(out + n, out + nb, 0);
      }
    }
  });
  return {idx, cnt};
}

}  // namespace

TORCH_LIBRARY_IMPL(tasksieve, CPU, m) { m.impl("select_blocks", &select_blocks_cpu); }

}  // namespace tasksieve
