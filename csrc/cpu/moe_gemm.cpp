// CPU implementations of the PreMoe expert GEMM ops (schemas in csrc/ops.cpp, references in
// python/tasksieve/reference.py):
//
//   expert_gemm  x [T, K] or [T*top_k, K], w [E_c, N, K], moe_align's (sorted_ids, tile_expert,
//                num_padded) -> y [T*top_k, N or N/2]
//   moe_forward  x [T, H], w13 [E_c, 2I, H], w2 [E_c, H, I], topk_ids [T, k], topk_weights
//                [T, k], expert_map? -> [T, H]
//
// At decode the expert FFN is bound by reading the weights, so the CPU does what touches each
// kept weight once: the input rows of every slot are gathered once, grouped by expert ([m, K]
// per expert), and each expert's GEMM runs against its [N, K] weight (a transposed view, no
// copy). Experts with no rows (pruned, unused) touch nothing. The work items are (expert, range
// of output columns): every expert's columns are cut into enough ranges that all threads get
// about the same number of weight bytes, and the items run in parallel, each a single-threaded
// GEMM: the small-m bf16 kernel below at decode, else BLAS (ATen ops run serially inside
// at::parallel_for; small GEMMs threaded inside BLAS are slow and suffer most when the machine
// is busy). SiLU(gate) * up, the router weight and the scatter are fused passes over each
// item's GEMM output, in fp32.
//
// moe_forward groups the slots itself with a counting sort (the padded moe_align layout buys
// nothing on a CPU) and combines each token's k rows in fp32 in slot order: deterministic.
// Tile walk and slot math: include/tasksieve/expert_gemm_index.h, shared with the CUDA kernel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../checks/moe_gemm_checks.h"
#include "tasksieve/expert_gemm_index.h"

namespace tasksieve {
namespace {

// One expert's rows: slots [begin, end) of a slot list, all routed to expert e.
struct Group {
  int64_t e, begin, end;
};

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

// One work item: output columns [c0, c1) of one group's GEMM.
struct Item {
  int64_t g, c0, c1;
};

// Cuts the `ncols` output columns of every group into ranges (multiples of 16 columns) so that
// there are at least 4 items per thread, or one item per group when groups alone are enough.
std::vector<Item> column_items(const std::vector<Group>& groups, int64_t ncols) {
  std::vector<Item> items;
  const int64_t n = static_cast<int64_t>(groups.size());
  if (n == 0 || ncols <= 0) return items;
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t parts = std::max<int64_t>(1, (want + n - 1) / n);
  const int64_t width = std::min(ncols, round_up((ncols + parts - 1) / parts, int64_t{16}));
  // Column range major: at::parallel_for hands each thread a contiguous run of items, so every
  // thread gets a share of every expert, whatever their row counts.
  for (int64_t c0 = 0; c0 < ncols; c0 += width)
    for (int64_t g = 0; g < n; ++g) items.push_back({g, c0, std::min(c0 + width, ncols)});
  return items;
}

template <typename Fn>
void for_each_item(const std::vector<Item>& items, const Fn& fn) {
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    // Worker threads do not inherit the caller's dispatch state: without this guard at::mm on
    // expert weights that require grad re-enters autograd there, which fails under
    // torch.inference_mode() ("Inference tensors cannot be saved for backward").
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = i0; i < i1; ++i) fn(items[i]);
  });
}

// ---------------------------------------------------------------------------------------------
// Small-m bf16 GEMM. At decode an expert sees a handful of rows, and BLAS's bf16 GEMM (oneDNN)
// reaches well under the memory bandwidth there (about half of it at m = 4 on one core). This
// kernel streams each block of weight rows from memory once for all input rows, with AVX512-BF16
// dot products (vdpbf16ps: bf16 pairs, fp32 accumulation), 32 K elements per step. Used for bf16
// with m <= kSmallM on CPUs that have AVX512-BF16; the rest goes to at::mm.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kSmallM = 16;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TS_HAVE_DPBF16 1
#pragma GCC diagnostic ignored "-Wpsabi"

constexpr int kCB = 6;  // weight rows per block

// RB rows of `a` (from `ar`) against the kCB weight rows `wr` (K tail in `tail`):
// out[i * len + c0 + j].
template <int RB>
__attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline)) inline void dp_block(
    const uint16_t* ar, int64_t lda, const uint16_t* const* wr, const uint16_t (*tail)[32],
    int64_t K, int64_t k_main, int64_t c0, int64_t len, float* out) {
  __m512 acc[RB][kCB];
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < kCB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < K; kk += 32) {
    const bool in_tail = kk == k_main;
    __m512bh wv[kCB];
    for (int j = 0; j < kCB; ++j)
      wv[j] = (__m512bh)_mm512_loadu_si512(in_tail ? tail[j] : wr[j] + kk);
    for (int i = 0; i < RB; ++i) {
      const __m512bh av = (__m512bh)_mm512_loadu_si512(ar + i * lda + kk);
      for (int j = 0; j < kCB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, wv[j]);
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < kCB && c0 + j < len; ++j)
      out[i * len + c0 + j] = _mm512_reduce_add_ps(acc[i][j]);
}

// out[r * len + c] = sum_k a[r * lda + k] * w[c * K + k] for r < m, c < len: a bf16 rows
// zero-padded to lda (a multiple of 32, >= K); w bf16 rows of K. Per block of kCB weight rows:
// blocks of 4 input rows (24 accumulators, 6 weight and 1 input vector fill the 32 AVX-512
// registers), then the last m % 4 rows one by one while the weight rows are still in cache. The
// K tail of the weight rows is copied into a zero-padded block, so no load runs past a row;
// weight rows past len repeat the last one and their sums are dropped.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void small_m_gemm_dpbf16(
    const uint16_t* a, int64_t m, int64_t lda, const uint16_t* w, int64_t K, int64_t len,
    float* out) {
  const int64_t k_main = K / 32 * 32;
  const int64_t m4 = m / 4 * 4;
  for (int64_t c0 = 0; c0 < len; c0 += kCB) {
    const uint16_t* wr[kCB];
    for (int j = 0; j < kCB; ++j) wr[j] = w + std::min(c0 + j, len - 1) * K;
    alignas(64) uint16_t tail[kCB][32];
    if (k_main < K)
      for (int j = 0; j < kCB; ++j) {
        std::memset(tail[j], 0, sizeof(tail[j]));
        std::memcpy(tail[j], wr[j] + k_main, (K - k_main) * sizeof(uint16_t));
      }
    for (int64_t r0 = 0; r0 < m4; r0 += 4)
      dp_block<4>(a + r0 * lda, lda, wr, tail, K, k_main, c0, len, out + r0 * len);
    for (int64_t r = m4; r < m; ++r)
      dp_block<1>(a + r * lda, lda, wr, tail, K, k_main, c0, len, out + r * len);
  }
}

bool cpu_has_dpbf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}
#else
#define TS_HAVE_DPBF16 0
#endif

// out[r * len + c] (fp32, r < m) = a[r] . w[e, r0 + c]: a [m, K] contiguous, w [E, N, K]
// contiguous. `out` is resized here.
void rows_gemm_f32(const at::Tensor& a, const at::Tensor& w, int64_t e, int64_t r0, int64_t len,
                   std::vector<float>& out) {
  const int64_t m = a.size(0), K = a.size(1);
#if TS_HAVE_DPBF16
  if (a.scalar_type() == at::kBFloat16 && m <= kSmallM && cpu_has_dpbf16()) {
    const int64_t lda = round_up(K, int64_t{32});
    std::vector<uint16_t> a_pad(m * lda, 0);  // the K tail is zero: adds nothing
    const auto* src = reinterpret_cast<const uint16_t*>(a.const_data_ptr());
    for (int64_t r = 0; r < m; ++r) std::memcpy(&a_pad[r * lda], src + r * K, K * 2);
    const auto* wp = reinterpret_cast<const uint16_t*>(w.const_data_ptr()) +
                     (e * w.size(1) + r0) * K;
    out.resize(m * len);
    small_m_gemm_dpbf16(a_pad.data(), m, lda, wp, K, len, out.data());
    return;
  }
#endif
  const at::Tensor o = at::mm(a, w.select(0, e).narrow(0, r0, len).t()).to(at::kFloat)
                           .contiguous();
  out.resize(m * len);
  std::memcpy(out.data(), o.const_data_ptr<float>(), m * len * sizeof(float));
}

// ---------------------------------------------------------------------------------------------
// expert_gemm
// ---------------------------------------------------------------------------------------------

// y[slot, c0 : c0 + len] = (silu(gate) * up, or out) * router weight, rounded to y's dtype once
// here. The fp32 gate/up come from the dpbf16 kernel (bf16 decode) or from at::mm, which
// for fp16/bf16 inputs has already rounded them to the input dtype (converting the weights to
// fp32 instead would double the weight traffic); tests bound both within dtype tolerances.
template <typename scalar_t>
void expert_gemm_epilogue(const std::vector<float>& out, const std::vector<float>* up,
                          const int64_t* slots, int64_t m, int64_t c0, int64_t len,
                          int64_t N_out, const float* weights, scalar_t* y) {
  for (int64_t r = 0; r < m; ++r) {
    const int64_t s = slots[r];
    const float scale = weights ? weights[s] : 1.0f;
    scalar_t* dst = y + s * N_out + c0;
    for (int64_t c = 0; c < len; ++c) {
      float v = out[r * len + c];
      if (up) v = silu(v) * (*up)[r * len + c];
      dst[c] = static_cast<scalar_t>(v * scale);
    }
  }
}

at::Tensor expert_gemm_cpu(const at::Tensor& x, const at::Tensor& w,
                           const at::Tensor& sorted_ids, const at::Tensor& tile_expert,
                           const at::Tensor& num_padded, int64_t block_m, int64_t top_k,
                           bool gather, c10::string_view activation,
                           const std::optional<at::Tensor>& topk_weights) {
  TORCH_CHECK(x.device().is_cpu(), "tasksieve.expert_gemm: x must be a CPU tensor here, got ",
              x.device());
  const checks::ExpertGemmDims d = checks::check_expert_gemm_args(
      x, w, sorted_ids, tile_expert, num_padded, block_m, top_k, gather, activation,
      topk_weights);
  const at::Tensor ids = sorted_ids.contiguous(), tiles = tile_expert.contiguous();
  const int64_t rows_used = num_padded.contiguous().const_data_ptr<int32_t>()[0];
  const int32_t* id = ids.const_data_ptr<int32_t>();
  const int32_t* te = tiles.const_data_ptr<int32_t>();
  checks::check_expert_gemm_values(d, block_m, id, te, rows_used);

  at::Tensor y = at::zeros({d.S, d.N_out}, x.options());
  if (d.S == 0 || d.N_out == 0) return y;

  // Runs of consecutive tiles of one expert become one group; padding rows are dropped here.
  std::vector<int64_t> slot_list, src_list;
  std::vector<Group> groups;
  for (int64_t t = 0; t < d.tiles && moe::tile_active(t, block_m, rows_used); ++t) {
    const int64_t e = te[t];
    if (!moe::tile_expert_valid(e, d.E_c)) continue;
    if (groups.empty() || groups.back().e != e || groups.back().end != (int64_t)slot_list.size())
      groups.push_back({e, (int64_t)slot_list.size(), (int64_t)slot_list.size()});
    for (int64_t r = t * block_m; r < (t + 1) * block_m; ++r) {
      const int64_t s = id[r];
      if (!moe::slot_valid(s, d.S)) continue;
      slot_list.push_back(s);
      src_list.push_back(moe::slot_source_row(s, top_k, gather));
    }
    groups.back().end = (int64_t)slot_list.size();
  }
  if (slot_list.empty()) return y;

  const auto lopts = at::TensorOptions().dtype(at::kLong);
  at::Tensor src = at::empty({(int64_t)src_list.size()}, lopts);
  std::copy(src_list.begin(), src_list.end(), src.data_ptr<int64_t>());
  const at::Tensor xs = at::index_select(x.contiguous(), 0, src);  // rows in group order
  const at::Tensor wc = w.contiguous();
  std::optional<at::Tensor> wts;
  if (topk_weights.has_value()) wts = topk_weights->to(at::kFloat).contiguous();
  const float* wp = wts.has_value() ? wts->const_data_ptr<float>() : nullptr;
  const std::vector<Item> items = column_items(groups, d.N_out);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "expert_gemm", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    for_each_item(items, [&](const Item& it) {
      const Group& g = groups[it.g];
      const int64_t m = g.end - g.begin;
      if (m == 0) return;
      const at::Tensor a = xs.narrow(0, g.begin, m);
      const int64_t len = it.c1 - it.c0;
      std::vector<float> out, up;
      rows_gemm_f32(a, wc, g.e, it.c0, len, out);
      if (d.silu_mul) rows_gemm_f32(a, wc, g.e, d.N_out + it.c0, len, up);
      expert_gemm_epilogue<scalar_t>(out, d.silu_mul ? &up : nullptr, slot_list.data() + g.begin,
                                     m, it.c0, len, d.N_out, wp, yp);
    });
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// moe_forward
// ---------------------------------------------------------------------------------------------

at::Tensor moe_forward_cpu(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                           const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                           const std::optional<at::Tensor>& expert_map) {
  TORCH_CHECK(x.device().is_cpu(), "tasksieve.moe_forward: x must be a CPU tensor here, got ",
              x.device());
  const checks::MoeForwardDims d =
      checks::check_moe_forward_args(x, w13, w2, topk_ids, topk_weights, expert_map);
  const int64_t T = d.T, H = d.H, I = d.I, k = d.k, E_c = d.E_c, S = T * k;
  at::Tensor out = at::empty({T, H}, x.options());
  if (T == 0 || H == 0) return out;

  // Compact expert of every slot (-1: dropped), validated on the way.
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const int64_t* idp = ids.const_data_ptr<int64_t>();
  std::optional<at::Tensor> map;
  if (expert_map.has_value()) map = expert_map->contiguous();
  const int32_t* mp = map.has_value() ? map->const_data_ptr<int32_t>() : nullptr;
  if (mp) {
    for (int64_t i = 0; i < d.num_experts; ++i)
      TORCH_CHECK(mp[i] >= -1 && mp[i] < E_c, "tasksieve.moe_forward: expert_map values must be "
                  "in [-1, E_c = ", E_c, "), got ", mp[i], " at ", i);
  }
  std::vector<int64_t> compact(S);
  std::vector<int64_t> count(E_c + 1, 0);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t e = idp[s];
    TORCH_CHECK(e >= 0 && e < d.num_experts, "tasksieve.moe_forward: topk_ids values must be in "
                "[0, num_experts = ", d.num_experts, ") (",
                mp ? "expert_map's length" : "E_c = w13.size(0)", "), got ", e, " at token ",
                s / k, ", column ", s % k);
    compact[s] = mp ? mp[e] : e;
    if (compact[s] >= 0) ++count[compact[s] + 1];
  }
  // Stable counting sort of the kept slots by compact expert.
  for (int64_t e = 0; e < E_c; ++e) count[e + 1] += count[e];
  const int64_t kept = count[E_c];
  const auto lopts = at::TensorOptions().dtype(at::kLong);
  at::Tensor slots = at::empty({kept}, lopts), tokens = at::empty({kept}, lopts);
  int64_t* sp = slots.data_ptr<int64_t>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  {
    std::vector<int64_t> pos(count.begin(), count.end() - 1);
    for (int64_t s = 0; s < S; ++s) {
      if (compact[s] < 0) continue;
      const int64_t p = pos[compact[s]]++;
      sp[p] = s;
      tp[p] = s / k;
    }
  }
  std::vector<Group> groups;
  for (int64_t e = 0; e < E_c; ++e)
    if (count[e + 1] > count[e]) groups.push_back({e, count[e], count[e + 1]});

  // Per-slot weighted expert outputs in fp32; dropped slots stay 0.
  at::Tensor ybuf = at::zeros({S, H}, x.options().dtype(at::kFloat));
  float* yb = ybuf.data_ptr<float>();
  const at::Tensor wts = topk_weights.to(at::kFloat).contiguous();
  const float* wp = wts.const_data_ptr<float>();
  const at::Tensor xs = at::index_select(x.contiguous(), 0, tokens);  // rows in group order
  const at::Tensor w13c = w13.contiguous(), w2c = w2.contiguous();
  at::Tensor h = at::empty({kept, I}, x.options());  // silu(gate) * up, rows in group order

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_forward", [&] {
    // Gate/up: item = expert x range of the I columns; its gate and up rows together.
    scalar_t* hp = h.data_ptr<scalar_t>();
    for_each_item(column_items(groups, I), [&](const Item& it) {
      const Group& g = groups[it.g];
      const int64_t m = g.end - g.begin, len = it.c1 - it.c0;
      const at::Tensor a = xs.narrow(0, g.begin, m);
      std::vector<float> gate, up;
      rows_gemm_f32(a, w13c, g.e, it.c0, len, gate);
      rows_gemm_f32(a, w13c, g.e, I + it.c0, len, up);
      for (int64_t r = 0; r < m; ++r) {
        scalar_t* dst = hp + (g.begin + r) * I + it.c0;
        for (int64_t c = 0; c < len; ++c)
          dst[c] = static_cast<scalar_t>(silu(gate[r * len + c]) * up[r * len + c]);
      }
    });
    // Down: item = expert x range of the H output columns; router weight, scatter to slots.
    for_each_item(column_items(groups, H), [&](const Item& it) {
      const Group& g = groups[it.g];
      const int64_t m = g.end - g.begin, len = it.c1 - it.c0;
      std::vector<float> y;
      rows_gemm_f32(h.narrow(0, g.begin, m), w2c, g.e, it.c0, len, y);
      for (int64_t r = 0; r < m; ++r) {
        const int64_t s = sp[g.begin + r];
        const float scale = wp[s];
        float* dst = yb + s * H + it.c0;
        for (int64_t c = 0; c < len; ++c) dst[c] = y[r * len + c] * scale;
      }
    });
    // out[t] = sum over j of the slot rows t*k + j, in slot order (deterministic).
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const float* rows = yb + t * k * H;
        for (int64_t c = 0; c < H; ++c) {
          float acc = 0.f;
          for (int64_t j = 0; j < k; ++j) acc += rows[j * H + c];
          op[t * H + c] = static_cast<scalar_t>(acc);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tasksieve, CPU, m) {
  m.impl("expert_gemm", &expert_gemm_cpu);
  m.impl("moe_forward", &moe_forward_cpu);
}

}  // namespace tasksieve
