// Sparse expert GEMM (torch-free): PreMoe's grouped GEMM over the kept experts, and the
// combine over the k slots of a token.
//
//   ExpertGemm<T>(x, w, sorted_ids, tile_expert, num_padded, topk_weights, y, S, K, N, E_c, P,
//                 block_m, top_k, gather, silu_mul, stream) -> cudaError_t
//   MoeCombine<T>(y, out, T, k, H, stream) -> cudaError_t
//   MoeForward<T>(x, w13, w2, ids64, topk_ids, ..., plan, workspace, stream): moe_forward's
//                 launch sequence; plan = MakeMoeForwardPlan(...) (tile height, workspace layout)
//   ExpertGemmLaunch / MoeForwardLaunch(DType, ...): the same with the dtype as a runtime tag
//
// T = __half or __nv_bfloat16. Layout of moe_align: sorted_ids int32 [P] (slot ids, each
// expert's run padded to a multiple of block_m with the sentinel S = T*top_k), tile_expert int32
// [P / block_m] (compact expert, -1 unused), num_padded int32 [1], all on the device (read
// there: no host sync). x [T, K] (gather: slot s reads row s / top_k) or [S, K]; w [E_c, N, K]
// contiguous; y [S, N_out] contiguous, N_out = N / 2 with silu_mul (w rows: N/2 gate, N/2 up),
// else N; topk_weights fp32 [S] or null. K % 8 == 0, x and w 16-byte aligned, block_m in
// {16, 32, 64}. ExpertGemm writes only the rows of the slots its tiles list; the caller zeroes y
// when other rows are read.
//
// Kernel: one CTA of 4 warps per (tile of block_m sorted rows, 64 output columns). A tile past
// num_padded, or whose expert is out of [0, E_c), exits before touching memory. The tile's
// slot ids go to shared memory first; then a kStages-deep cp.async pipeline streams K in steps
// of 32: the A rows are gathered straight from x through the slot ids (padding rows are
// zero-filled by cp.async's src-size 0, never read), the B rows are the expert's weight rows
// (with silu_mul, the 64 gate rows and the 64 matching up rows, so one CTA owns both halves of
// its columns). MMA: WMMA m16n16k16, fp32 accumulators. Epilogue through shared memory: silu(g)
// * u, times the router weight of the slot, rounded once to T, written to the slot's row. The
// padded gate/up product (2I wide) never reaches global memory.
//
// MoeCombine: out[t, c] = sum over j < k of y[t*k + j, c], in fp32, in j order (deterministic).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "tasksieve/common.h"
#include "tasksieve/cuda_convert.cuh"
#include "tasksieve/dtype.cuh"
#include "tasksieve/expert_gemm_index.h"
#include "tasksieve/moe_route.cuh"

namespace tasksieve {

namespace egemm_detail {

constexpr int kBN = 64;       // output columns per CTA
constexpr int kBK = 32;       // K elements per pipeline stage
constexpr int kThreads = 128; // 4 warps
constexpr int kLdS = kBK + 8; // smem row of a stage, in elements (80 bytes: WMMA-aligned rows)
constexpr int kPadC = 4;      // fp32 epilogue row padding, in floats

template <int BM, bool kSilu>
struct Cfg {
  static_assert(BM == 16 || BM == 32 || BM == 64, "block_m must be 16, 32 or 64");
  static constexpr int kStages = BM == 16 ? 6 : 4;  // decode tiles: more bytes in flight
  static constexpr int kWRows = kSilu ? 2 * kBN : kBN;
  static constexpr int kWarpsM = BM == 16 ? 1 : 2;
  static constexpr int kWarpsN = 4 / kWarpsM;
  static constexpr int kFM = BM / (16 * kWarpsM);   // 16-row fragments per warp
  static constexpr int kFN = kBN / (16 * kWarpsN);  // 16-column fragments per warp (per half)
  static constexpr int kLdC = kWRows + kPadC;
  static constexpr size_t kInfo = (size_t(BM) * 12 + 127) / 128 * 128;  // int64 src + int32 slot
  static constexpr size_t kStageA = size_t(BM) * kLdS * 2;
  static constexpr size_t kStageB = size_t(kWRows) * kLdS * 2;
  static constexpr size_t kPipe = kStages * (kStageA + kStageB);
  static constexpr size_t kC = size_t(BM) * kLdC * 4;
  static constexpr size_t kBytes = kInfo + (kPipe > kC ? kPipe : kC);
};

using cuda_convert::from_float;
using cuda_convert::to_float;

// 16-byte global -> shared copy; src_bytes 0 fills the 16 bytes with zeros and reads nothing.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename T, int BM, bool kSilu, typename OutT = T>
__global__ void __launch_bounds__(kThreads)
    ExpertGemmKernel(const T* __restrict__ x, const T* __restrict__ w,
                     const int32_t* __restrict__ sorted_ids,
                     const int32_t* __restrict__ tile_expert,
                     const int32_t* __restrict__ num_padded,
                     const float* __restrict__ topk_weights, OutT* __restrict__ y, int64_t S,
                     int64_t K, int64_t N, int64_t N_out, int64_t E_c, int64_t P, int64_t top_k,
                     bool gather) {
  using namespace nvcuda;
  using C = Cfg<BM, kSilu>;
  const int64_t tile = blockIdx.x;
  // Uniform over the CTA, before any barrier: unused and invalid tiles cost one launch slot.
  if (!moe::tile_active(tile, BM, moe::active_rows(num_padded[0], P))) return;
  const int64_t e = tile_expert[tile];
  if (!moe::tile_expert_valid(e, E_c)) return;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  int64_t* s_src = reinterpret_cast<int64_t*>(smem_raw);            // input row, -1: padding
  int32_t* s_slot = reinterpret_cast<int32_t*>(smem_raw + BM * 8);  // slot id, -1: padding
  unsigned char* pipe = smem_raw + C::kInfo;

  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const int64_t s = sorted_ids[tile * BM + r];
    const bool ok = moe::slot_valid(s, S);
    s_slot[r] = ok ? static_cast<int32_t>(s) : -1;
    s_src[r] = ok ? moe::slot_source_row(s, top_k, gather) : -1;
  }
  __syncthreads();

  const T* w_e = w + e * N * K;
  const int64_t I = N_out;  // gate/up split of silu_mul (unused otherwise)
  auto stage_a = [&](int st) {
    return reinterpret_cast<T*>(pipe + st * (C::kStageA + C::kStageB));
  };
  auto stage_b = [&](int st) {
    return reinterpret_cast<T*>(pipe + st * (C::kStageA + C::kStageB) + C::kStageA);
  };
  auto load_stage = [&](int st, int64_t k0) {
    T* sa = stage_a(st);
    T* sb = stage_b(st);
    for (int i = threadIdx.x; i < BM * (kBK / 8); i += kThreads) {
      const int r = i / (kBK / 8), c = i % (kBK / 8);
      const int64_t kk = k0 + c * 8;
      const int64_t row = s_src[r];
      const bool ok = row >= 0 && kk < K;
      cp_async_16(sa + r * kLdS + c * 8, ok ? x + row * K + kk : x, ok ? 16 : 0);
    }
    for (int i = threadIdx.x; i < C::kWRows * (kBK / 8); i += kThreads) {
      const int r = i / (kBK / 8), c = i % (kBK / 8);
      const int64_t kk = k0 + c * 8;
      const int64_t row = moe::weight_row(r, n0, kBN, I, kSilu, N);
      const bool ok = row >= 0 && kk < K;
      cp_async_16(sb + r * kLdS + c * 8, ok ? w_e + row * K + kk : w, ok ? 16 : 0);
    }
  };

  const int warp = threadIdx.x / 32;
  const int wm = warp / C::kWarpsN, wn = warp % C::kWarpsN;
  constexpr int kHalves = kSilu ? 2 : 1;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kHalves][C::kFM][C::kFN];
#pragma unroll
  for (int h = 0; h < kHalves; ++h)
#pragma unroll
    for (int i = 0; i < C::kFM; ++i)
#pragma unroll
      for (int j = 0; j < C::kFN; ++j) wmma::fill_fragment(acc[h][i][j], 0.f);

  const int64_t nk = ceil_div(K, static_cast<int64_t>(kBK));
#pragma unroll
  for (int st = 0; st < C::kStages - 1; ++st) {
    if (st < nk) load_stage(st, st * kBK);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < nk; ++kt) {
    cp_async_wait<C::kStages - 2>();
    __syncthreads();  // stage kt landed for every thread; stage kt - 1 is free to refill
    const int64_t next = kt + C::kStages - 1;
    if (next < nk) load_stage(static_cast<int>(next % C::kStages), next * kBK);
    cp_async_commit();

    const int st = static_cast<int>(kt % C::kStages);
    const T* sa = stage_a(st);
    const T* sb = stage_b(st);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[C::kFM];
#pragma unroll
      for (int i = 0; i < C::kFM; ++i)
        wmma::load_matrix_sync(fa[i], sa + ((wm * C::kFM + i) * 16) * kLdS + kk, kLdS);
#pragma unroll
      for (int h = 0; h < kHalves; ++h) {
#pragma unroll
        for (int j = 0; j < C::kFN; ++j) {
          // B = W^T: the [n][k] rows in shared memory are a column-major [k][n] operand.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, sb + (h * kBN + (wn * C::kFN + j) * 16) * kLdS + kk, kLdS);
#pragma unroll
          for (int i = 0; i < C::kFM; ++i) wmma::mma_sync(acc[h][i][j], fa[i], fb, acc[h][i][j]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the pipeline before the epilogue reuses it

  float* s_c = reinterpret_cast<float*>(pipe);
#pragma unroll
  for (int h = 0; h < kHalves; ++h)
#pragma unroll
    for (int i = 0; i < C::kFM; ++i)
#pragma unroll
      for (int j = 0; j < C::kFN; ++j)
        wmma::store_matrix_sync(
            s_c + ((wm * C::kFM + i) * 16) * C::kLdC + h * kBN + (wn * C::kFN + j) * 16,
            acc[h][i][j], C::kLdC, wmma::mem_row_major);
  __syncthreads();

  for (int i = threadIdx.x; i < BM * kBN; i += kThreads) {
    const int r = i / kBN, c = i % kBN;
    const int64_t slot = s_slot[r];
    const int64_t n = n0 + c;
    if (slot < 0 || n >= N_out) continue;
    float v = s_c[r * C::kLdC + c];
    if (kSilu) {
      const float u = s_c[r * C::kLdC + kBN + c];
      v = v / (1.f + __expf(-v)) * u;
    }
    if (topk_weights != nullptr) v *= topk_weights[slot];
    y[slot * N_out + n] = from_float<OutT>(v);
  }
}

template <typename T>
__global__ void MoeCombineKernel(const float* __restrict__ y, T* __restrict__ out, int64_t T_,
                                 int64_t k, int64_t H) {
  const int64_t total = T_ * H;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / H, c = i % H;
    const float* rows = y + t * k * H + c;
    float acc = 0.f;
    for (int64_t j = 0; j < k; ++j) acc += rows[j * H];
    out[i] = from_float<T>(acc);
  }
}

template <typename T, int BM, bool kSilu, typename OutT>
cudaError_t LaunchExpertGemm(const T* x, const T* w, const int32_t* sorted_ids,
                             const int32_t* tile_expert, const int32_t* num_padded,
                             const float* topk_weights, OutT* y, int64_t S, int64_t K, int64_t N,
                             int64_t N_out, int64_t E_c, int64_t P, int64_t top_k, bool gather,
                             cudaStream_t stream) {
  using C = Cfg<BM, kSilu>;
  auto kernel = ExpertGemmKernel<T, BM, kSilu, OutT>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(C::kBytes));
  if (err != cudaSuccess) return err;
  // One CTA per tile of the layout (moe::gemm_grid_tiles): the tiles in use are found on the
  // device (num_padded, tile_expert), and they need not be a prefix of the layout (the CPU op
  // accepts any), so no bound short of P / BM is safe without a host sync. Unused tiles exit
  // after two loads.
  const dim3 grid(static_cast<unsigned>(moe::gemm_grid_tiles(P, BM)),
                  static_cast<unsigned>(ceil_div(N_out, int64_t{kBN})));
  kernel<<<grid, kThreads, C::kBytes, stream>>>(x, w, sorted_ids, tile_expert, num_padded,
                                                topk_weights, y, S, K, N, N_out, E_c, P, top_k,
                                                gather);
  return cudaGetLastError();
}

}  // namespace egemm_detail

// OutT: T, or float for the slot rows moe_forward combines (so each result is rounded once).
template <typename T, typename OutT = T>
cudaError_t ExpertGemm(const T* x, const T* w, const int32_t* sorted_ids,
                       const int32_t* tile_expert, const int32_t* num_padded,
                       const float* topk_weights, OutT* y, int64_t S, int64_t K, int64_t N,
                       int64_t E_c, int64_t P, int64_t block_m, int64_t top_k, bool gather,
                       bool silu_mul, cudaStream_t stream) {
  using namespace egemm_detail;
  if (block_m != 16 && block_m != 32 && block_m != 64) return cudaErrorInvalidValue;
  if (K < 0 || K % 8 != 0 || N < 0 || (silu_mul && N % 2 != 0) || top_k < 1 || E_c < 1 ||
      P < 0 || P % block_m != 0)
    return cudaErrorInvalidValue;
  if (!is_aligned(x, 16) || !is_aligned(w, 16)) return cudaErrorInvalidValue;
  const int64_t N_out = silu_mul ? N / 2 : N;
  if (S == 0 || P == 0 || N_out == 0) return cudaSuccess;
  if (P / block_m > 2147483647LL || ceil_div(N_out, int64_t{kBN}) > 65535)
    return cudaErrorInvalidConfiguration;
#define TS_EGEMM_LAUNCH(BM)                                                                  \
  return silu_mul ? LaunchExpertGemm<T, BM, true, OutT>(x, w, sorted_ids, tile_expert, num_padded, \
                                                  topk_weights, y, S, K, N, N_out, E_c, P,   \
                                                  top_k, gather, stream)                     \
                  : LaunchExpertGemm<T, BM, false, OutT>(x, w, sorted_ids, tile_expert, num_padded, \
                                                   topk_weights, y, S, K, N, N_out, E_c, P,  \
                                                   top_k, gather, stream)
  if (block_m == 16) TS_EGEMM_LAUNCH(16);
  if (block_m == 32) TS_EGEMM_LAUNCH(32);
  TS_EGEMM_LAUNCH(64);
#undef TS_EGEMM_LAUNCH
}

// out[t] = sum_j y[t * k + j] (fp32 slot rows, summed in j order), rounded once to T.
template <typename T>
cudaError_t MoeCombine(const float* y, T* out, int64_t T_, int64_t k, int64_t H,
                       cudaStream_t stream) {
  using namespace egemm_detail;
  if (T_ < 0 || k < 1 || H < 0) return cudaErrorInvalidValue;
  const int64_t total = T_ * H;
  if (total == 0) return cudaSuccess;
  constexpr int kThreadsCombine = 256;
  const int64_t blocks = ts_min(ceil_div(total, int64_t{kThreadsCombine}), int64_t{65535} * 16);
  MoeCombineKernel<T><<<static_cast<unsigned>(blocks), kThreadsCombine, 0, stream>>>(y, out, T_,
                                                                                     k, H);
  return cudaGetLastError();
}

// ---- Entry points of the torch glue (csrc/cuda/moe_gemm.cu) and the simulator runner
// (csrc/sim/sim_premoe.cu) -----------------------------------------------------------------------

// expert_gemm: ExpertGemm<T> (y in x's dtype) for dt = fp16 or bf16.
inline cudaError_t ExpertGemmLaunch(DType dt, const void* x, const void* w,
                                    const int32_t* sorted_ids, const int32_t* tile_expert,
                                    const int32_t* num_padded, const float* topk_weights, void* y,
                                    int64_t S, int64_t K, int64_t N, int64_t E_c, int64_t P,
                                    int64_t block_m, int64_t top_k, bool gather, bool silu_mul,
                                    cudaStream_t stream) {
  return DispatchHalf(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return ExpertGemm<T>(static_cast<const T*>(x), static_cast<const T*>(w), sorted_ids,
                         tile_expert, num_padded, topk_weights, static_cast<T*>(y), S, K, N, E_c,
                         P, block_m, top_k, gather, silu_mul, stream);
  });
}

// moe_forward's tile height and workspace: one device buffer of `bytes`, carved at 256-byte
// aligned offsets into moe_align's outputs and scratch, h (silu(gate) * up per slot, T) and y
// (weighted slot rows, fp32, zeroed by MoeForward itself). No initialisation needed.
struct MoeForwardPlan {
  int64_t S = 0, block_m = 16, P = 0;
  size_t sorted_off = 0, tiles_off = 0, npad_off = 0, align_off = 0, align_bytes = 0;
  size_t h_off = 0, y_off = 0, y_bytes = 0, bytes = 0;
};

inline MoeForwardPlan MakeMoeForwardPlan(int64_t T_, int64_t H, int64_t I, int64_t E_c,
                                         int64_t k, int64_t num_experts, size_t elem_bytes) {
  MoeForwardPlan p;
  p.S = T_ * k;
  p.block_m = moe::choose_block_m(p.S, E_c);
  p.P = moe::padded_size(p.S, num_experts, p.block_m);
  auto carve = [&](size_t n) {
    const size_t off = p.bytes;
    p.bytes = round_up<size_t>(off + n, 256);
    return off;
  };
  p.sorted_off = carve(static_cast<size_t>(p.P) * sizeof(int32_t));
  p.tiles_off = carve(static_cast<size_t>(p.P / p.block_m) * sizeof(int32_t));
  p.npad_off = carve(sizeof(int32_t));
  p.align_bytes = MoeAlignWorkspaceBytes(p.S, num_experts);
  p.align_off = carve(p.align_bytes);
  p.h_off = carve(static_cast<size_t>(p.S) * I * elem_bytes);
  p.y_bytes = static_cast<size_t>(p.S) * H * sizeof(float);
  p.y_off = carve(p.y_bytes);
  return p;
}

// moe_forward (csrc/ops.cpp) on the device, no host sync: moe_align (block_m and P from the
// plan) -> ExpertGemm(x, w13, gather, silu_mul) into h [S, I] -> ExpertGemm(h, w2, router
// weights) into fp32 y [S, H] (rows of dropped slots stay 0) -> MoeCombine into out [T, H].
// x [T, H], w13 [E_c, 2I, H], w2 [E_c, H, I] contiguous, 16-byte aligned, H % 8 == I % 8 == 0;
// topk_ids [T, k] int32/int64 (ids64) contiguous; topk_weights fp32 [T, k]; expert_map int32
// [num_experts] or nullptr; workspace: plan.bytes bytes, 256-byte aligned.
template <typename T>
cudaError_t MoeForward(const T* x, const T* w13, const T* w2, bool ids64, const void* topk_ids,
                       const float* topk_weights, const int32_t* expert_map, T* out, int64_t T_,
                       int64_t H, int64_t I, int64_t E_c, int64_t k, int64_t num_experts,
                       const MoeForwardPlan& plan, void* workspace, cudaStream_t stream) {
  if (T_ < 0 || H < 0 || I < 1 || k < 1 || E_c < 1 || num_experts < 1 || plan.S != T_ * k)
    return cudaErrorInvalidValue;
  if (T_ == 0 || H == 0) return cudaSuccess;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  int32_t* sorted = reinterpret_cast<int32_t*>(ws + plan.sorted_off);
  int32_t* tiles = reinterpret_cast<int32_t*>(ws + plan.tiles_off);
  int32_t* npad = reinterpret_cast<int32_t*>(ws + plan.npad_off);
  T* h = reinterpret_cast<T*>(ws + plan.h_off);
  float* y = reinterpret_cast<float*>(ws + plan.y_off);
  cudaError_t err = MoeAlignLaunch(ids64, topk_ids, plan.S, num_experts, plan.block_m,
                                   expert_map, sorted, tiles, npad, ws + plan.align_off,
                                   plan.align_bytes, stream);
  if (err != cudaSuccess) return err;
  // h rows of dropped slots are never read (the down GEMM walks the same tiles); y rows of
  // dropped slots must read as 0 in the combine. y is fp32 so each output is rounded once,
  // after the sum over the k slots, as on the CPU (k rounded terms could cancel badly).
  if ((err = cudaMemsetAsync(y, 0, plan.y_bytes, stream)) != cudaSuccess) return err;
  err = ExpertGemm<T>(x, w13, sorted, tiles, npad, nullptr, h, plan.S, H, 2 * I, E_c, plan.P,
                      plan.block_m, k, /*gather=*/true, /*silu_mul=*/true, stream);
  if (err != cudaSuccess) return err;
  err = ExpertGemm<T, float>(h, w2, sorted, tiles, npad, topk_weights, y, plan.S, I, H, E_c,
                             plan.P, plan.block_m, k, /*gather=*/false, /*silu_mul=*/false,
                             stream);
  if (err != cudaSuccess) return err;
  return MoeCombine<T>(y, out, T_, k, H, stream);
}

// MoeForward for dt = fp16 or bf16.
inline cudaError_t MoeForwardLaunch(DType dt, const void* x, const void* w13, const void* w2,
                                    bool ids64, const void* topk_ids, const float* topk_weights,
                                    const int32_t* expert_map, void* out, int64_t T_, int64_t H,
                                    int64_t I, int64_t E_c, int64_t k, int64_t num_experts,
                                    const MoeForwardPlan& plan, void* workspace,
                                    cudaStream_t stream) {
  return DispatchHalf(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return MoeForward<T>(static_cast<const T*>(x), static_cast<const T*>(w13),
                         static_cast<const T*>(w2), ids64, topk_ids, topk_weights, expert_map,
                         static_cast<T*>(out), T_, H, I, E_c, k, num_experts, plan, workspace,
                         stream);
  });
}

#ifdef TASKSIEVE_COMPILE_CHECK
#define TASKSIEVE_INSTANTIATE_EGEMM(T)                                                        \
  template cudaError_t ExpertGemm<T>(const T*, const T*, const int32_t*, const int32_t*,      \
                                     const int32_t*, const float*, T*, int64_t, int64_t,      \
                                     int64_t, int64_t, int64_t, int64_t, int64_t, bool, bool, \
                                     cudaStream_t);                                           \
  template cudaError_t ExpertGemm<T, float>(const T*, const T*, const int32_t*,               \
                                            const int32_t*, const int32_t*, const float*,     \
                                            float*, int64_t, int64_t, int64_t, int64_t,       \
                                            int64_t, int64_t, int64_t, bool, bool,            \
                                            cudaStream_t);                                    \
  template cudaError_t MoeCombine<T>(const float*, T*, int64_t, int64_t, int64_t, cudaStream_t);
TASKSIEVE_INSTANTIATE_EGEMM(__half)
TASKSIEVE_INSTANTIATE_EGEMM(__nv_bfloat16)
#undef TASKSIEVE_INSTANTIATE_EGEMM
#endif

}  // namespace tasksieve
