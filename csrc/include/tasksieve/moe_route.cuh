// PreMoe routing kernels (torch-free): router top-k, TCESS accumulation, expert alignment.
//
//   RouteTopk<T>(logits, ..., topk_weights, topk_ids, stream)       -> cudaError_t
//   TcessUpdate<T>(logits, ..., acc, count, workspace, stream)       -> cudaError_t
//   TcessUpdateWorkspaceBytes(Tn, E)                                 -> size_t
//   MoeAlign<Id>(topk_ids, ..., sorted_ids, tile_expert, num_padded, workspace, stream)
//   MoeAlignWorkspaceBytes(num_slots, num_experts)                   -> size_t
//   TcessUpdateLaunch / RouteTopkLaunch(DType, ...), MoeAlignLaunch(ids64, ...): the same with
//   the element type as a runtime tag (what the torch glue and the simulator runner call)
//
// Contracts: route_topk, tcess_update, moe_align in csrc/ops.cpp; ranking rule and sizes in
// moe_index.h (shared with the CPU impls). T is float, __half or __nv_bfloat16 (math in fp32).
//
// Routing (RouteTopk, TcessUpdate): one warp per token, E <= kMaxExperts. Each lane owns the
// experts e = lane + 32*i; the warp writes one 64-bit key per expert (moe::route_key, 0 = not
// selectable) to its shared-memory slice, and picks the top k by k rounds of a warp max: every
// lane keeps the best of its own keys, the shuffle-max is the winner, and only the owning lane
// drops it and rescans. Keys are distinct, so the order is exact and device independent.
// TcessUpdate sums into per-warp fp64 copies of acc in shared memory (no atomics: a token's k
// experts are distinct, one lane each), writes per-block sums to a workspace, and a second
// launch adds them to acc in block order: bitwise deterministic, and no fp64 atomics (which
// the functional simulator also lacks).
//
// Alignment (MoeAlign), a stable counting sort in three launches, no host sync:
//   1. count:   the S = T*k slots are cut into segments of contiguous slots, one warp each;
//               per segment and compact expert, the slot count -> ws_cnt[seg][c].
//   2. scan:    one block: ws_cnt[.][c] becomes the exclusive prefix over segments, the padded
//               runs are scanned over experts into ws_off[c]; writes num_padded, tile_expert
//               and the sentinel of every padding row.
//   3. scatter: each segment's warp walks its slots in order (32 at a time, ranks among equal
//               experts by __match_any_sync) and writes slot s to ws_off[c] + ws_cnt[seg][c] +
//               its rank, so slots stay ascending within an expert.
// Ids outside [0, E) and expert_map entries outside [0, E) drop their slot (never an
// out-of-bounds access); the CPU op raises on them instead.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>

#include "tasksieve/common.h"
#include "tasksieve/dtype.cuh"
#include "tasksieve/moe_index.h"

namespace tasksieve {
namespace moe_route_detail {

constexpr int kMaxExperts = 1024;
constexpr int kSmemBudget = 48 * 1024;  // the default dynamic shared memory limit
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float Load(const float* p) { return *p; }
__device__ __forceinline__ float Load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float Load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ uint64_t WarpMaxU64(uint64_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const uint64_t o = __shfl_xor_sync(kFull, v, off);
    v = o > v ? o : v;
  }
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// Merges the softmax statistics (max m, sum l of exp(x - m)) of (m, l) and (om, ol). A side with
// m = -inf has l = 0 and contributes nothing (no -inf - -inf).
__device__ __forceinline__ void MergeStats(float& m, float& l, float om, float ol) {
  const float nm = fmaxf(m, om);
  l = (m == nm ? l : l * expf(m - nm)) + (om == nm ? ol : ol * expf(om - nm));
  m = nm;
}

__device__ __forceinline__ uint64_t LaneBest(const uint64_t* keys, int E, int lane) {
  uint64_t best = 0;
  for (int e = lane; e < E; e += 32) best = keys[e] > best ? keys[e] : best;
  return best;
}

// sel[j], j < k: the experts of the k largest keys in decreasing key order, -1 once no key is
// left (all 0). keys is the warp's slice; each lane touches only its own experts.
__device__ __forceinline__ void WarpTopK(uint64_t* keys, int E, int k, int* sel, int lane) {
  uint64_t best = LaneBest(keys, E, lane);
  for (int j = 0; j < k; ++j) {
    const uint64_t m = WarpMaxU64(best);
    if (m == 0) {  // uniform across the warp
      if (lane == 0) sel[j] = -1;
      continue;
    }
    const int id = static_cast<int>(moe::route_key_expert(m));
    if (lane == 0) sel[j] = id;
    if ((id & 31) == lane) {
      keys[id] = 0;
      best = LaneBest(keys, E, lane);
    }
  }
  __syncwarp();
}

// Warps per block for routing: as many as shared memory allows, at most 8.
// Warps per block that fit kSmemBudget: each warp holds E keys + E selections, plus
// `per_expert_extra` more bytes per expert (TcessUpdate's per-warp sums).
inline int RouteWarps(int64_t E, size_t extra_bytes, size_t per_expert_extra = 0) {
  const int64_t per_warp =
      E * static_cast<int64_t>(sizeof(uint64_t) + sizeof(int) + per_expert_extra);
  int64_t w = (kSmemBudget - static_cast<int64_t>(extra_bytes)) / per_warp;
  return static_cast<int>(w < 1 ? 1 : (w > 8 ? 8 : w));
}

template <typename T>
__global__ void RouteTopkKernel(const T* __restrict__ logits, int64_t Tn, int E, int64_t s0,
                                int64_t s1, int k, int scoring, bool renormalize,
                                const bool* __restrict__ keep, const float* __restrict__ bias,
                                float scaling, bool mask_full, float* __restrict__ w_out,
                                int32_t* __restrict__ id_out) {
  extern __shared__ uint64_t route_smem[];
  const int wpb = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint64_t* keys = route_smem + static_cast<int64_t>(warp) * E;
  int* sel = reinterpret_cast<int*>(route_smem + static_cast<int64_t>(wpb) * E) +
             static_cast<int64_t>(warp) * E;
  const float ninf = ts_neg_inf();
  const bool softmax = scoring == static_cast<int>(moe::Scoring::kSoftmax);
  const bool sigmoid = scoring == static_cast<int>(moe::Scoring::kSigmoid);
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * wpb + warp; t < Tn;
       t += static_cast<int64_t>(gridDim.x) * wpb) {
    const T* row = logits + t * s0;
    float m = ninf, l = 0.f;  // softmax statistics over the denominator set
    if (softmax) {
      for (int e = lane; e < E; e += 32)
        if (mask_full || !keep || keep[e]) MergeStats(m, l, Load(row + e * s1), 1.f);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const float om = __shfl_xor_sync(kFull, m, off), ol = __shfl_xor_sync(kFull, l, off);
        MergeStats(m, l, om, ol);
      }
    }
    for (int e = lane; e < E; e += 32) {
      const float z = Load(row + e * s1);
      float key = z;
      if (bias) {
        const float s = softmax ? expf(z - m) / l : (sigmoid ? 1.f / (1.f + expf(-z)) : z);
        key = s + bias[e];
      }
      keys[e] = (!keep || keep[e]) ? moe::route_key(key, e) : 0;
    }
    WarpTopK(keys, E, k, sel, lane);
    // Weights of the columns j = lane + 32*i; the sums run over the whole warp.
    float part = 0.f, zmax = ninf;
    for (int j = lane; j < k; j += 32) {
      const int id = sel[j];
      if (id < 0) continue;
      const float z = Load(row + id * s1);
      if (softmax) {
        part += expf(z - m) / l;
      } else if (sigmoid) {
        part += 1.f / (1.f + expf(-z));
      } else {
        zmax = fmaxf(zmax, z);
      }
    }
    float norm = 1.f;  // what the weights are divided by: 1 unless topk_softmax or renormalize
    if (!softmax && !sigmoid) {
      zmax = WarpMax(zmax);
      float se = 0.f;
      for (int j = lane; j < k; j += 32)
        if (sel[j] >= 0) se += expf(Load(row + sel[j] * s1) - zmax);
      norm = WarpSum(se);
    } else if (renormalize) {
      norm = WarpSum(part);
    }
    for (int j = lane; j < k; j += 32) {
      const int id = sel[j];
      float w = 0.f;
      if (id >= 0) {
        const float z = Load(row + id * s1);
        if (softmax) {
          w = expf(z - m) / l;
        } else if (sigmoid) {
          w = 1.f / (1.f + expf(-z));
        } else {
          w = expf(z - zmax);
        }
        w = w / norm * scaling;
      }
      w_out[t * k + j] = w;
      id_out[t * k + j] = id;
    }
    __syncwarp();  // sel is rewritten by the next token of this warp
  }
}

template <typename T>
__global__ void TcessUpdateKernel(const T* __restrict__ logits, int64_t Tn, int E, int64_t s0,
                                  int64_t s1, int k, float r, double* __restrict__ partial,
                                  unsigned long long* __restrict__ count) {
  extern __shared__ uint64_t tcess_smem[];
  const int wpb = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Per warp: its own fp64 sums [E], keys [E], selection [E]. The k experts a token selects are
  // distinct and each lane adds one of them, so a warp's sums need no atomics.
  double* warp_acc = reinterpret_cast<double*>(tcess_smem) + static_cast<int64_t>(warp) * E;
  uint64_t* keys = tcess_smem + static_cast<int64_t>(wpb) * E + static_cast<int64_t>(warp) * E;
  int* sel = reinterpret_cast<int*>(tcess_smem + 2 * static_cast<int64_t>(wpb) * E) +
             static_cast<int64_t>(warp) * E;
  for (int e = lane; e < E; e += 32) warp_acc[e] = 0.0;
  if (blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(count, static_cast<unsigned long long>(Tn));
  __syncwarp();
  const float ninf = ts_neg_inf();
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * wpb + warp; t < Tn;
       t += static_cast<int64_t>(gridDim.x) * wpb) {
    const T* row = logits + t * s0;
    for (int e = lane; e < E; e += 32) keys[e] = moe::route_key(Load(row + e * s1), e);
    WarpTopK(keys, E, k, sel, lane);  // k <= E: every sel[j] is an expert
    float zmax = ninf;
    for (int j = lane; j < k; j += 32) zmax = fmaxf(zmax, Load(row + sel[j] * s1));
    zmax = WarpMax(zmax);
    float se = 0.f;
    for (int j = lane; j < k; j += 32) se += expf(Load(row + sel[j] * s1) - zmax);
    const float sum = WarpSum(se);
    for (int j = lane; j < k; j += 32) {
      const float z = Load(row + sel[j] * s1);
      if (expf(z - zmax) / sum >= r) warp_acc[sel[j]] += static_cast<double>(z);
    }
    __syncwarp();
  }
  __syncthreads();
  // The block's sums, warps added in a fixed order: partial[block][e].
  const double* all = reinterpret_cast<const double*>(tcess_smem);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    double s = 0.0;
    for (int w = 0; w < wpb; ++w) s += all[static_cast<int64_t>(w) * E + e];
    partial[static_cast<int64_t>(blockIdx.x) * E + e] = s;
  }
}

// acc[e] += sum over blocks of partial[b][e], blocks in order: the result does not depend on
// the order in which blocks ran (no fp64 atomics), so repeated profiles give identical bits.
// A template (on its block size) so that several .cu files can include this header.
template <int kThreads>
__global__ void TcessReduceKernel(const double* __restrict__ partial, int64_t blocks, int E,
                                  double* __restrict__ acc) {
  for (int e = threadIdx.x; e < E; e += kThreads) {
    double s = 0.0;
    for (int64_t b = 0; b < blocks; ++b) s += partial[b * E + e];
    acc[e] += s;
  }
}

// ---- moe_align --------------------------------------------------------------------------------
constexpr int kAlignWarps = 4;         // segments per block in the count and scatter kernels
constexpr int kAlignScanThreads = 1024;  // >= kMaxExperts: one expert per thread in the scan

// Slots per segment: at least 256, and at most ~128 segments so that the scan's serial loop
// over segments stays short (the count and scatter warps then walk up to S/128 slots each).
inline int64_t AlignSegmentLength(int64_t num_slots) {
  const int64_t by_count = (num_slots + 127) / 128;
  const int64_t len = by_count > 256 ? by_count : 256;
  return round_up<int64_t>(len, 32);
}

inline int64_t AlignSegments(int64_t num_slots) {
  return ceil_div<int64_t>(num_slots, AlignSegmentLength(num_slots));
}

template <typename Id>
__device__ __forceinline__ int SlotExpert(const Id* ids, int64_t s, int64_t end, int E,
                                          const int32_t* map) {
  return s < end ? static_cast<int>(moe::compact_expert(static_cast<int64_t>(ids[s]), E, map))
                 : -1;
}

template <typename Id>
__global__ void AlignCountKernel(const Id* __restrict__ ids, int64_t S, int64_t seg_len,
                                 int64_t segs, int E, const int32_t* __restrict__ map,
                                 int32_t* __restrict__ ws_cnt) {
  extern __shared__ int32_t align_smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t seg = static_cast<int64_t>(blockIdx.x) * kAlignWarps + warp;
  if (seg >= segs) return;  // whole warps only: no block-wide barrier below
  int32_t* hist = align_smem + static_cast<int64_t>(warp) * E;
  for (int c = lane; c < E; c += 32) hist[c] = 0;
  __syncwarp();
  const int64_t begin = seg * seg_len, end = begin + seg_len < S ? begin + seg_len : S;
  for (int64_t s0 = begin; s0 < end; s0 += 32) {
    const int c = SlotExpert(ids, s0 + lane, end, E, map);
    const unsigned peers = __match_any_sync(kFull, c);
    if (c >= 0 && lane == __ffs(peers) - 1) hist[c] += __popc(peers);
    __syncwarp();
  }
  for (int c = lane; c < E; c += 32) ws_cnt[seg * E + c] = hist[c];
}

// A template (instantiated once, <kAlignScanThreads>) so that this header can be included by
// several .cu files of one program (expert_gemm.cuh's MoeForward runs moe_align too).
template <int kScanThreads>
__global__ void __launch_bounds__(kScanThreads)
    AlignScanKernel(int32_t* __restrict__ ws_cnt, int32_t* __restrict__ ws_off, int64_t segs,
                    int E, int block_m, int32_t sentinel, int64_t P,
                    int32_t* __restrict__ sorted_ids, int32_t* __restrict__ tile_expert,
                    int32_t* __restrict__ num_padded) {
  __shared__ int32_t s_off[kScanThreads + 1];  // run starts; s_off[E] = num_padded
  __shared__ int32_t warp_tot[kScanThreads / 32];
  const int c = threadIdx.x, lane = c % 32, warp = c / 32;
  int32_t total = 0;
  if (c < E) {  // exclusive prefix over segments, in place; 8 loads in flight at a time
    int64_t g = 0;
    for (; g + 8 <= segs; g += 8) {
      int32_t v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) v[u] = ws_cnt[(g + u) * E + c];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        ws_cnt[(g + u) * E + c] = total;
        total += v[u];
      }
    }
    for (; g < segs; ++g) {
      const int32_t v = ws_cnt[g * E + c];
      ws_cnt[g * E + c] = total;
      total += v;
    }
  }
  const int32_t run = static_cast<int32_t>(moe::align_run_length(total, block_m));
  // Block-wide exclusive scan of run: warp inclusive scans, then the warp totals.
  int32_t incl = run;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int32_t o = __shfl_up_sync(kFull, incl, off);
    if (lane >= off) incl += o;
  }
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int32_t v = warp_tot[lane], wincl = v;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int32_t o = __shfl_up_sync(kFull, wincl, off);
      if (lane >= off) wincl += o;
    }
    warp_tot[lane] = wincl - v;  // exclusive
  }
  __syncthreads();
  const int32_t start = warp_tot[warp] + incl - run;
  if (c < E) {
    s_off[c] = start;
    ws_off[c] = start;
    for (int32_t i = start + total; i < start + run; ++i) sorted_ids[i] = sentinel;
  }
  if (c == E - 1) {
    s_off[E] = start + run;
    *num_padded = start + run;
  }
  __syncthreads();
  const int32_t used = s_off[E];
  for (int64_t i = used + c; i < P; i += kScanThreads) sorted_ids[i] = sentinel;
  const int64_t tiles = P / block_m, used_tiles = used / block_m;
  for (int64_t t = c; t < tiles; t += kScanThreads) {
    int32_t e = -1;
    if (t < used_tiles) {  // the last expert whose run starts at or before row t * block_m
      const int64_t row = t * block_m;
      int lo = 0, hi = E - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (s_off[mid] <= row) lo = mid; else hi = mid - 1;
      }
      e = lo;
    }
    tile_expert[t] = e;
  }
}

template <typename Id>
__global__ void AlignScatterKernel(const Id* __restrict__ ids, int64_t S, int64_t seg_len,
                                   int64_t segs, int E, const int32_t* __restrict__ map,
                                   const int32_t* __restrict__ ws_cnt,
                                   const int32_t* __restrict__ ws_off,
                                   int32_t* __restrict__ sorted_ids) {
  extern __shared__ int32_t align_smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t seg = static_cast<int64_t>(blockIdx.x) * kAlignWarps + warp;
  if (seg >= segs) return;
  int32_t* cursor = align_smem + static_cast<int64_t>(warp) * E;
  for (int c = lane; c < E; c += 32) cursor[c] = ws_off[c] + ws_cnt[seg * E + c];
  __syncwarp();
  const unsigned lower = (1u << lane) - 1u;
  const int64_t begin = seg * seg_len, end = begin + seg_len < S ? begin + seg_len : S;
  for (int64_t s0 = begin; s0 < end; s0 += 32) {
    const int64_t s = s0 + lane;
    const int c = SlotExpert(ids, s, end, E, map);
    const unsigned peers = __match_any_sync(kFull, c);
    const int32_t pos = c >= 0 ? cursor[c] + __popc(peers & lower) : 0;
    __syncwarp();  // every lane has read its cursor before the leader moves it
    if (c >= 0) {
      sorted_ids[pos] = static_cast<int32_t>(s);
      if (lane == __ffs(peers) - 1) cursor[c] += __popc(peers);
    }
    __syncwarp();
  }
}

}  // namespace moe_route_detail

// Per token t: the top_k kept experts and their weights (route_topk in csrc/ops.cpp).
//   logits       [Tn, E] with strides (s0, s1), in elements
//   keep_mask    bool [E] or nullptr (all kept); bias fp32 [E] or nullptr
//   topk_weights fp32 [Tn, top_k], topk_ids int32 [Tn, top_k], contiguous
// A token with fewer than top_k kept experts (the caller's check was skipped) gets id -1 and
// weight 0 in the columns it cannot fill. 1 <= top_k <= E <= 1024.
template <typename T>
cudaError_t RouteTopk(const T* logits, int64_t Tn, int64_t E, int64_t s0, int64_t s1,
                      int64_t top_k, moe::Scoring scoring, bool renormalize,
                      const bool* keep_mask, const float* bias, float scaling, bool mask_full,
                      float* topk_weights, int32_t* topk_ids, cudaStream_t stream) {
  namespace d = moe_route_detail;
  if (Tn < 0 || E < 1 || E > d::kMaxExperts || top_k < 1 || top_k > E)
    return cudaErrorInvalidValue;
  if (Tn == 0) return cudaSuccess;
  const int wpb = d::RouteWarps(E, 0);
  const size_t smem = static_cast<size_t>(wpb) * E * (sizeof(uint64_t) + sizeof(int));
  const int64_t blocks = ts_min<int64_t>(ceil_div<int64_t>(Tn, wpb), 65535);
  d::RouteTopkKernel<T><<<static_cast<unsigned>(blocks), wpb * 32, smem, stream>>>(
      logits, Tn, static_cast<int>(E), s0, s1, static_cast<int>(top_k),
      static_cast<int>(scoring), renormalize, keep_mask, bias, scaling, mask_full, topk_weights,
      topk_ids);
  return cudaGetLastError();
}

// Grid of TcessUpdate: warps per block, and blocks (at most 256, so the partial sums stay small).
inline int TcessWarps(int64_t E) {
  return moe_route_detail::RouteWarps(E, 0, sizeof(double));
}
inline int64_t TcessBlocks(int64_t Tn, int64_t E) {
  return ts_min<int64_t>(ceil_div<int64_t>(ts_max<int64_t>(Tn, 1), TcessWarps(E)), 256);
}
// Scratch of TcessUpdate: fp64 [blocks, E] partial sums, no initialisation needed.
inline size_t TcessUpdateWorkspaceBytes(int64_t Tn, int64_t E) {
  return static_cast<size_t>(TcessBlocks(Tn, E) * E) * sizeof(double);
}

// tcess_update: acc fp64 [E] contiguous += the token contributions; *count += Tn.
// 1 <= top_k <= E <= 1024. workspace: TcessUpdateWorkspaceBytes(Tn, E) bytes. Two launches:
// per block fp64 sums (warps in a fixed order), then one block adds the blocks in order; the
// sums are therefore deterministic (no floating-point atomics).
template <typename T>
cudaError_t TcessUpdate(const T* logits, int64_t Tn, int64_t E, int64_t s0, int64_t s1,
                        int64_t top_k, float r, double* acc, int64_t* count, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream) {
  namespace d = moe_route_detail;
  if (Tn < 0 || E < 1 || E > d::kMaxExperts || top_k < 1 || top_k > E)
    return cudaErrorInvalidValue;
  if (Tn == 0) return cudaSuccess;
  if (workspace == nullptr || workspace_bytes < TcessUpdateWorkspaceBytes(Tn, E))
    return cudaErrorInvalidValue;
  const int wpb = TcessWarps(E);
  const size_t smem =
      static_cast<size_t>(wpb) * E * (sizeof(double) + sizeof(uint64_t) + sizeof(int));
  const int64_t blocks = TcessBlocks(Tn, E);
  double* partial = static_cast<double*>(workspace);
  d::TcessUpdateKernel<T><<<static_cast<unsigned>(blocks), wpb * 32, smem, stream>>>(
      logits, Tn, static_cast<int>(E), s0, s1, static_cast<int>(top_k), r, partial,
      reinterpret_cast<unsigned long long*>(count));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  d::TcessReduceKernel<256><<<1, 256, 0, stream>>>(partial, blocks, static_cast<int>(E), acc);
  return cudaGetLastError();
}

// Scratch of MoeAlign: int32 [segments * E + E].
inline size_t MoeAlignWorkspaceBytes(int64_t num_slots, int64_t num_experts) {
  return static_cast<size_t>(moe_route_detail::AlignSegments(num_slots) * num_experts +
                             num_experts) * sizeof(int32_t);
}

// moe_align (csrc/ops.cpp): topk_ids contiguous [T, k] flattened to num_slots = T*k slots
// (the sentinel), expert_map int32 [E] or nullptr; outputs sorted_ids int32 [P], tile_expert
// int32 [P / block_m], num_padded int32 [1], P = moe::align_padded_size(num_slots, E, block_m)
// < 2^31. workspace: MoeAlignWorkspaceBytes(num_slots, E) bytes, no initialisation needed.
// 1 <= E <= 1024.
template <typename Id>
cudaError_t MoeAlign(const Id* topk_ids, int64_t num_slots, int64_t num_experts, int64_t block_m,
                     const int32_t* expert_map, int32_t* sorted_ids, int32_t* tile_expert,
                     int32_t* num_padded, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream) {
  namespace d = moe_route_detail;
  if (num_slots < 0 || num_experts < 1 || num_experts > d::kMaxExperts || block_m < 1)
    return cudaErrorInvalidValue;
  const int64_t P = moe::align_padded_size(num_slots, num_experts, block_m);
  if (P > INT_MAX || workspace_bytes < MoeAlignWorkspaceBytes(num_slots, num_experts))
    return cudaErrorInvalidValue;
  const int E = static_cast<int>(num_experts);
  const int64_t seg_len = d::AlignSegmentLength(num_slots), segs = d::AlignSegments(num_slots);
  int32_t* ws_cnt = static_cast<int32_t*>(workspace);
  int32_t* ws_off = ws_cnt + segs * E;
  const size_t smem = static_cast<size_t>(d::kAlignWarps) * E * sizeof(int32_t);
  const int64_t blocks = ceil_div<int64_t>(segs, d::kAlignWarps);
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  cudaError_t err;
  if (segs > 0) {
    d::AlignCountKernel<Id><<<static_cast<unsigned>(blocks), d::kAlignWarps * 32, smem, stream>>>(
        topk_ids, num_slots, seg_len, segs, E, expert_map, ws_cnt);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  d::AlignScanKernel<d::kAlignScanThreads><<<1, d::kAlignScanThreads, 0, stream>>>(
      ws_cnt, ws_off, segs, E, static_cast<int>(block_m), static_cast<int32_t>(num_slots), P,
      sorted_ids, tile_expert, num_padded);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (segs > 0) {
    d::AlignScatterKernel<Id>
        <<<static_cast<unsigned>(blocks), d::kAlignWarps * 32, smem, stream>>>(
            topk_ids, num_slots, seg_len, segs, E, expert_map, ws_cnt, ws_off, sorted_ids);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// ---- Entry points of the torch glue (csrc/cuda/moe_route.cu) and the simulator runner
// (csrc/sim/sim_premoe.cu): the dtype dispatch lives here, so both reach the same variants.

// TcessUpdate for logits of dtype `dt` (fp32, fp16 or bf16).
inline cudaError_t TcessUpdateLaunch(DType dt, const void* logits, int64_t Tn, int64_t E,
                                     int64_t s0, int64_t s1, int64_t top_k, float r, double* acc,
                                     int64_t* count, void* workspace, size_t workspace_bytes,
                                     cudaStream_t stream) {
  return DispatchFloat(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return TcessUpdate<T>(static_cast<const T*>(logits), Tn, E, s0, s1, top_k, r, acc, count,
                          workspace, workspace_bytes, stream);
  });
}

// RouteTopk for logits of dtype `dt` (fp32, fp16 or bf16).
inline cudaError_t RouteTopkLaunch(DType dt, const void* logits, int64_t Tn, int64_t E,
                                   int64_t s0, int64_t s1, int64_t top_k, moe::Scoring scoring,
                                   bool renormalize, const bool* keep_mask, const float* bias,
                                   float scaling, bool mask_full, float* topk_weights,
                                   int32_t* topk_ids, cudaStream_t stream) {
  return DispatchFloat(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return RouteTopk<T>(static_cast<const T*>(logits), Tn, E, s0, s1, top_k, scoring,
                        renormalize, keep_mask, bias, scaling, mask_full, topk_weights, topk_ids,
                        stream);
  });
}

// MoeAlign for int64 (ids64) or int32 topk_ids.
inline cudaError_t MoeAlignLaunch(bool ids64, const void* topk_ids, int64_t num_slots,
                                  int64_t num_experts, int64_t block_m, const int32_t* expert_map,
                                  int32_t* sorted_ids, int32_t* tile_expert, int32_t* num_padded,
                                  void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  return ids64 ? MoeAlign<int64_t>(static_cast<const int64_t*>(topk_ids), num_slots, num_experts,
                                   block_m, expert_map, sorted_ids, tile_expert, num_padded,
                                   workspace, workspace_bytes, stream)
               : MoeAlign<int32_t>(static_cast<const int32_t*>(topk_ids), num_slots, num_experts,
                                   block_m, expert_map, sorted_ids, tile_expert, num_padded,
                                   workspace, workspace_bytes, stream);
}

#ifdef TASKSIEVE_COMPILE_CHECK
#define TASKSIEVE_INSTANTIATE_MOE_ROUTE(T)                                                     \
  template cudaError_t RouteTopk<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t,     \
                                    moe::Scoring, bool, const bool*, const float*, float, bool, \
                                    float*, int32_t*, cudaStream_t);                            \
  template cudaError_t TcessUpdate<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t,   \
                                      float, double*, int64_t*, void*, size_t, cudaStream_t);
TASKSIEVE_INSTANTIATE_MOE_ROUTE(float)
TASKSIEVE_INSTANTIATE_MOE_ROUTE(__half)
TASKSIEVE_INSTANTIATE_MOE_ROUTE(__nv_bfloat16)
#undef TASKSIEVE_INSTANTIATE_MOE_ROUTE
template cudaError_t MoeAlign<int32_t>(const int32_t*, int64_t, int64_t, int64_t, const int32_t*,
                                       int32_t*, int32_t*, int32_t*, void*, size_t, cudaStream_t);
template cudaError_t MoeAlign<int64_t>(const int64_t*, int64_t, int64_t, int64_t, const int32_t*,
                                       int32_t*, int32_t*, int32_t*, void*, size_t, cudaStream_t);
#endif

}  // namespace tasksieve
