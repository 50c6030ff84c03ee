// PreMoe routing index math shared by the CPU impls (csrc/cpu/moe_route.cpp) and the CUDA
// kernels (moe_route.cuh). Torch-free, header-only; every function is TS_HOST_DEVICE (plain
// inline under g++). Contracts: tcess_update, route_topk, moe_align in csrc/ops.cpp.
//
// Top-k ranking (route_topk, tcess_update): higher score first, equal scores to the lower expert
// id; NaN ranks as -inf and -0 as +0, so the order is a strict total order and every device
// picks the same experts.
//   uint32_t route_order_bits(float x)     monotone float -> uint32 under that rule
//   uint64_t route_key(float x, int64_t e) distinct key of expert e (e < 2^32 - 1), > 0, larger =
//                                          ranked first; 0 is free for "not selectable"
//   Scoring                                route_topk's scoring: softmax, sigmoid, topk_softmax
//   int64_t  route_key_expert(uint64_t k)  the expert a key belongs to
//   bool     ranks_before(a, ea, b, eb)    a's expert ranks before b's (the same order as keys)
//
// Alignment (moe_align), S = T * top_k slots, slot s = t * top_k + j:
//   int64_t align_sentinel(T, top_k)             T * top_k: the padding value of sorted_ids
//   int64_t align_padded_size(S, E, block_m)     P = round_up(S + E * (block_m - 1), block_m), the
//                                                fixed length of sorted_ids (worst case: every
//                                                expert's run one short of a multiple of block_m)
//   int64_t align_num_tiles(S, E, block_m)       P / block_m, the length of tile_expert
//   int64_t align_run_length(count, block_m)     an expert run padded to whole tiles (0 stays 0)
//   int64_t slot_token(slot, top_k)              the token a slot belongs to
//   int64_t compact_expert(id, E, map)           compact expert of an id: map[id] (identity without
//                                                a map), -1 (dropped) for ids or map entries
//                                                outside [0, E)
#pragma once

#include <cstdint>

#include "tasksieve/common.h"

namespace tasksieve {
namespace moe {

// route_topk's `scoring` argument.
enum class Scoring : int { kSoftmax = 0, kSigmoid = 1, kTopkSoftmax = 2 };

TS_HOST_DEVICE TS_INLINE uint32_t route_order_bits(float x) {
  if (x != x) x = ts_neg_inf();
  if (x == 0.f) x = 0.f;  // folds -0 into +0
  union {
    float f;
    uint32_t u;
  } v;
  v.f = x;
  return (v.u & 0x80000000u) ? ~v.u : (v.u | 0x80000000u);
}

TS_HOST_DEVICE TS_INLINE uint64_t route_key(float x, int64_t e) {
  // -inf maps to 0x007FFFFF, so the high word, hence the key, is never 0.
  return (static_cast<uint64_t>(route_order_bits(x)) << 32) |
         static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(e));
}

TS_HOST_DEVICE TS_INLINE int64_t route_key_expert(uint64_t key) {
  return static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFu));
}

TS_HOST_DEVICE TS_INLINE bool ranks_before(float a, int64_t ea, float b, int64_t eb) {
  const uint32_t ka = route_order_bits(a), kb = route_order_bits(b);
  return ka > kb || (ka == kb && ea < eb);
}

TS_HOST_DEVICE TS_INLINE int64_t align_sentinel(int64_t T, int64_t top_k) { return T * top_k; }

TS_HOST_DEVICE TS_INLINE int64_t align_padded_size(int64_t num_slots, int64_t num_experts,
                                                   int64_t block_m) {
  return round_up<int64_t>(num_slots + num_experts * (block_m - 1), block_m);
}

TS_HOST_DEVICE TS_INLINE int64_t align_num_tiles(int64_t num_slots, int64_t num_experts,
                                                 int64_t block_m) {
  return align_padded_size(num_slots, num_experts, block_m) / block_m;
}

TS_HOST_DEVICE TS_INLINE int64_t align_run_length(int64_t count, int64_t block_m) {
  return round_up<int64_t>(count, block_m);
}

TS_HOST_DEVICE TS_INLINE int64_t slot_token(int64_t slot, int64_t top_k) { return slot / top_k; }

TS_HOST_DEVICE TS_INLINE int64_t compact_expert(int64_t id, int64_t num_experts,
                                                const int32_t* expert_map) {
  if (id < 0 || id >= num_experts) return -1;
  const int64_t c = expert_map ? static_cast<int64_t>(expert_map[id]) : id;
  return (c < 0 || c >= num_experts) ? -1 : c;
}

}  // namespace moe
}  // namespace tasksieve
