// Simulator runner for the WindowKV ops: each case directory names an op and holds its
// arguments (csrc/sim/sim_io.h); the op runs through the same header entry points as the CUDA
// glue in csrc/cuda/kv_window.cu (WindowScoresLaunch, SelectWindows, MakeGatherDesc +
// GatherWindows / GatherWindowsInplace), with the same output allocation. Argument checks are
// the glue's (torch) business: tests/sim/sim_windowkv.py hands over only inputs they accept.
#include <algorithm>
#include <string>
#include <vector>

#include "sim_dtype.h"
#include "sim_io.h"
#include "tasksieve/gather_windows.cuh"
#include "tasksieve/select_windows.cuh"
#include "tasksieve/window_index.h"
#include "tasksieve/window_scores.cuh"

namespace tasksieve {
namespace sim {
namespace {

// window_scores(q_obs [B, A, H, D], k [B, N, Hk, D], window, reduce, scale, kv_start) -> fp32
// [B, Hk, nw]. The case passes q contiguous and k either contiguous ("k") or as the physical
// HF cache [B, Hk, N, D] with k_bhnd = 1 (the glue takes k.transpose(1, 2) as is: strides).
// scale: a float or None (the glue's default, WindowScoresDefaultScale).
void window_scores(Case& c) {
  Tensor& q = c.in("q_obs");
  Tensor& k = c.in("k");
  const bool bhnd = c.b("k_bhnd");
  const int64_t B = q.size(0), A = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t N = bhnd ? k.size(2) : k.size(1), Hk = bhnd ? k.size(1) : k.size(2);
  const int64_t ksb = k.size(1) * k.size(2) * D;
  const int64_t ksn = bhnd ? D : Hk * D, ksh = bhnd ? N * D : D;
  const int64_t window = c.i("window");
  const std::string reduce = c.s("reduce");
  Tensor* ks = c.opt("kv_start");
  const int64_t nw = window::num_windows(N, A, window);
  Tensor& out = c.out("out", "f32", {B, Hk, nw}, Init::kGarbage);
  if (out.numel() == 0) return;
  const size_t ws_bytes = WindowScoresWorkspaceBytes(B, A, H, Hk, N, window);
  void* ws = c.scratch(ws_bytes, Init::kGarbage);
  const float sc = c.is_none("scale") ? WindowScoresDefaultScale(D)
                                      : static_cast<float>(c.f("scale"));
  check(WindowScoresLaunch(float_dtype(q.dtype), q.dev, k.dev,
                           ks ? ks->ptr<int32_t>() : nullptr, out.ptr<float>(), ws, ws_bytes, B,
                           A, H, Hk, N, D, window, A * H * D, H * D, D, ksb, ksn, ksh, sc,
                           reduce == "max", 0),
        "WindowScoresLaunch");
}

// select_windows(scores fp32 [B, Hk, nw], keep, share) -> int32 [B, Hk, min(keep, nw)].
void select_windows(Case& c) {
  Tensor& s = c.in("scores");
  const int64_t B = s.size(0), Hk = s.size(1), nw = s.size(2);
  const int64_t kk = std::min<int64_t>(c.i("keep"), nw);
  Tensor& out = c.out("out", "i32", {B, Hk, kk}, Init::kGarbage);
  if (out.numel() == 0) return;
  check(SelectWindows(s.ptr<float>(), out.ptr<int32_t>(), B, Hk, nw, kk, c.b("share"), 0),
        "SelectWindows");
}

// The kv list: entry i is a view [B, Hk, N, kv{i}_d] with element strides kv{i}_sb/_sh/_sn at
// element offset kv{i}_off into the buffer tensor kv{kv{i}_buf} (entries may share a buffer:
// views of one cache). B, Hk, N, num_kv are ints of the case.
struct KvEntry {
  Tensor* buf;
  int64_t off, sb, sh, sn, d;
};

std::vector<KvEntry> kv_entries(Case& c) {
  std::vector<KvEntry> kv;
  const int64_t n = c.i("num_kv");
  for (int64_t i = 0; i < n; ++i) {
    const std::string p = "kv" + std::to_string(i);
    KvEntry e;
    e.buf = &c.in("kv" + std::to_string(c.i(p + "_buf")));
    e.off = c.i(p + "_off");
    e.sb = c.i(p + "_sb");
    e.sh = c.i(p + "_sh");
    e.sn = c.i(p + "_sn");
    e.d = c.i(p + "_d");
    kv.push_back(e);
  }
  return kv;
}

const void* entry_ptr(const KvEntry& e) {
  return static_cast<const char*>(e.buf->dev) +
         e.off * static_cast<int64_t>(dtype_bytes(e.buf->dtype));
}

// gather_windows(kv, idx int32 [B, Hk, keep], window, tail) -> out{i} [B, Hk, L, D_i] contiguous
// (at::empty in the glue: garbage here).
void gather_windows(Case& c) {
  const std::vector<KvEntry> kv = kv_entries(c);
  Tensor& idx = c.in("idx");
  const int64_t B = c.i("B"), Hk = c.i("Hk"), N = c.i("N"), keep = idx.size(2);
  const int64_t window = c.i("window"), tail = c.i("tail");
  const int64_t L = window::gathered_len(keep, window, tail);
  std::vector<Tensor*> outs;
  for (size_t i = 0; i < kv.size(); ++i)
    outs.push_back(&c.out("out" + std::to_string(i), kv[i].buf->dtype, {B, Hk, L, kv[i].d},
                          Init::kGarbage));
  if (B == 0 || Hk == 0 || L == 0) return;
  std::vector<GatherDesc> descs;
  for (size_t i = 0; i < kv.size(); ++i) {
    const KvEntry& e = kv[i];
    descs.push_back(MakeGatherDesc(entry_ptr(e), e.sb, e.sh, e.sn, outs[i]->dev, Hk * L * e.d,
                                   L * e.d, e.d, e.d,
                                   static_cast<int64_t>(dtype_bytes(e.buf->dtype))));
  }
  check(GatherWindows(descs.data(), static_cast<int64_t>(descs.size()), idx.ptr<int32_t>(), B,
                      Hk, N, keep, window, tail, 0),
        "GatherWindows");
}

// gather_windows_(kv, idx, window, tail): every buffer comes back whole (in place).
void gather_windows_(Case& c) {
  const std::vector<KvEntry> kv = kv_entries(c);
  Tensor& idx = c.in("idx");
  for (int64_t i = 0; i < c.i("num_kv"); ++i)
    if (c.i("kv" + std::to_string(i) + "_buf") == i) c.inout("kv" + std::to_string(i));
  const int64_t B = c.i("B"), Hk = c.i("Hk"), N = c.i("N"), keep = idx.size(2);
  const int64_t window = c.i("window"), tail = c.i("tail");
  if (B == 0 || Hk == 0 || window::gathered_len(keep, window, tail) == 0) return;
  std::vector<GatherDesc> descs;
  for (const KvEntry& e : kv) {
    void* p = const_cast<void*>(entry_ptr(e));
    descs.push_back(MakeGatherDesc(p, e.sb, e.sh, e.sn, p, e.sb, e.sh, e.sn, e.d,
                                   static_cast<int64_t>(dtype_bytes(e.buf->dtype))));
  }
  check(GatherWindowsInplace(descs.data(), static_cast<int64_t>(descs.size()),
                             idx.ptr<int32_t>(), B, Hk, N, keep, window, tail, 0),
        "GatherWindowsInplace");
}

void dispatch(Case& c) {
  const std::string& op = c.op();
  if (op == "window_scores") return window_scores(c);
  if (op == "select_windows") return select_windows(c);
  if (op == "gather_windows") return gather_windows(c);
  if (op == "gather_windows_") return gather_windows_(c);
  throw std::runtime_error("sim_windowkv: unknown op " + op);
}

}  // namespace
}  // namespace sim
}  // namespace tasksieve

int main(int argc, char** argv) {
  return tasksieve::sim::run_cases(argc, argv, tasksieve::sim::dispatch);
}
