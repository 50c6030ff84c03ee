// Expert GEMM index math shared by the CPU impl (csrc/cpu/moe_gemm.cpp) and the CUDA kernel
// (expert_gemm.cuh). Torch-free, header-only; every function is TS_HOST_DEVICE (plain inline
// under g++).
//
// Notation (see expert_gemm / moe_forward in csrc/ops.cpp): S = T * top_k token slots, slot
// s = t * top_k + j; the moe_align layout is sorted_ids [P] (slot ids, each expert's run padded
// to a multiple of block_m with the sentinel S), tile_expert [P / block_m], num_padded.
//
//   int64_t padded_size(S, num_experts, block_m)     P = round_up(S + num_experts*(block_m-1),
//                                                    block_m), moe_align's sorted_ids length
//   int64_t active_rows(num_padded, P)               num_padded clamped into [0, P]
//   bool    tile_active(tile, block_m, rows)         tile * block_m < rows
//   bool    tile_expert_valid(e, E_c)                0 <= e < E_c (-1: an unused tile)
//   bool    slot_valid(s, S)                         0 <= s < S (else padding: row masked)
//   int64_t slot_source_row(s, top_k, gather)        input row of slot s: s / top_k or s
//   int64_t weight_row(r, n0, half, I, silu_mul, N)  weight row of local row r of an N-tile that
//                                                    starts at output column n0, or -1 past the
//                                                    end (silu_mul: rows [0, half) gate, then up)
//   int64_t choose_block_m(S, E_c)                   moe_forward's tile height on CUDA
//   int64_t gemm_grid_tiles(P, block_m)              CTAs along the tiles of the CUDA grid: every
//                                                    tile of the layout (P / block_m)
#pragma once

#include <cstdint>

#include "tasksieve/common.h"

namespace tasksieve {
namespace moe {

TS_HOST_DEVICE TS_INLINE int64_t padded_size(int64_t S, int64_t num_experts, int64_t block_m) {
  return round_up(S + num_experts * (block_m - 1), block_m);
}

TS_HOST_DEVICE TS_INLINE int64_t active_rows(int64_t num_padded, int64_t P) {
  return ts_clamp(num_padded, int64_t{0}, P);
}

TS_HOST_DEVICE TS_INLINE bool tile_active(int64_t tile, int64_t block_m, int64_t rows) {
  return tile * block_m < rows;
}

TS_HOST_DEVICE TS_INLINE bool tile_expert_valid(int64_t e, int64_t E_c) {
  return e >= 0 && e < E_c;
}

TS_HOST_DEVICE TS_INLINE bool slot_valid(int64_t s, int64_t S) { return s >= 0 && s < S; }

TS_HOST_DEVICE TS_INLINE int64_t slot_source_row(int64_t s, int64_t top_k, bool gather) {
  return gather ? s / top_k : s;
}

// An N-tile of `half` output columns starting at n0 reads, per output column c, weight row
// n0 + c ('none', N rows) or the gate row n0 + c and the up row I + n0 + c ('silu_mul', N = 2I).
// Local rows r in [0, half) are the first set, [half, 2*half) the up rows (silu_mul only).
TS_HOST_DEVICE TS_INLINE int64_t weight_row(int64_t r, int64_t n0, int64_t half, int64_t I,
                                            bool silu_mul, int64_t N) {
  if (!silu_mul) {
    const int64_t n = n0 + r;
    return (r < half && n < N) ? n : -1;
  }
  const bool up = r >= half;
  const int64_t c = n0 + (up ? r - half : r);
  if (r >= 2 * half || c >= I) return -1;
  return up ? I + c : c;
}

// Tile height for moe_forward: small tiles when the experts get few rows each (decode), so the
// padding does not multiply the tensor-core work; 64-row tiles once each expert has plenty.
TS_HOST_DEVICE TS_INLINE int64_t choose_block_m(int64_t S, int64_t E_c) {
  const int64_t per_expert = E_c > 0 ? S / E_c : S;
  if (per_expert >= 48) return 64;
  if (per_expert >= 24) return 32;
  return 16;
}

// The CUDA kernel's grid along the tiles. The tiles in use (tile_active and tile_expert_valid)
// are only known on the device and need not be a prefix of the layout (moe_align's are, a
// hand-built one the CPU op accepts need not be), so every tile gets a CTA; unused ones exit
// at once. A bound like ceil(S / block_m) + min(E_c, S) would skip valid tiles of such layouts.
TS_HOST_DEVICE TS_INLINE int64_t gemm_grid_tiles(int64_t P, int64_t block_m) {
  return block_m > 0 && P > 0 ? P / block_m : 0;
}

}  // namespace moe
}  // namespace tasksieve
