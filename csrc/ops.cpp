// THE list of tasksieve ops. Every schema lives here, one block per method; implementations
// register per dispatch key next to their code (csrc/cpu/*.cpp, csrc/cuda/*.cu), and fakes in
// python/tasksieve/ops.py. Conventions: index outputs are int32 and fixed-size (padded + count)
// so nothing syncs with the host; mutated arguments are marked (a!) and never returned.
#include <Python.h>
#include <torch/library.h>

// Importing tasksieve._C runs the static registrars below and in the impl files. The module
// itself is empty and uses only the limited C API, so one _C.abi3.so serves Python 3.10+.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(tasksieve, m) {
  // ---- WindowKV ---------------------------------------------------------------------------
  // q_obs [B, A, H, D] (the last A queries), k [B, N, Hk, D]; last dim contiguous, any other
  // strides (pass the HF cache [B, Hk, N, D] as k.transpose(1, 2)). Per query head: fp32 causal
  // softmax of the A queries over all N keys, summed over the queries; pooled into
  // nw = (N - A) // window windows ('max': mean of the top max(1, window/2) token scores,
  // 'mean': mean); averaged over the G = H/Hk query heads of each KV head. kv_start [B] int32
  // masks left padding (keys j < kv_start[b] get no mass). -> fp32 [B, Hk, nw]
  m.def("window_scores(Tensor q_obs, Tensor k, int window, str reduce, float? scale=None, "
        "Tensor? kv_start=None) -> Tensor");
  // scores [B, Hk, nw] fp32 -> int32 [B, Hk, min(keep, nw)]: the top windows per KV head, or
  // by the mean over heads when share (then every head gets the same row); ascending positions;
  // ties go to the lower index.
  m.def("select_windows(Tensor scores, int keep, bool share) -> Tensor");
  // kv: tensors [B, Hk, N, D_i] (K and V of every layer of a group, one launch); idx [B, Hk, keep]
  // from select_windows. Window p of the output is window idx[p] of the input (tokens
  // [idx*window, idx*window + window)), followed by the last `tail` tokens.
  // -> tensors [B, Hk, keep*window + tail, D_i]
  m.def("gather_windows(Tensor[] kv, Tensor idx, int window, int tail) -> Tensor[]");
  // Same, in place: compacts into the first keep*window + tail positions of each tensor (for a
  // preallocated cache); the caller narrows. Needs idx ascending and distinct per row.
  m.def("gather_windows_(Tensor(a!)[] kv, Tensor idx, int window, int tail) -> ()");
}
