// Host side of the simulator runner (torch-free): reads a case directory written by
// tests/sim/gpusim.py, uploads its tensors to device memory, and writes the op's outputs back.
// The runner programs (csrc/sim/sim_<family>.cu) are linked with `nvcc -arch=sm_80 -cudart
// shared` so the GPU simulator can stand in for libcudart; on a real card they run unchanged.
//
// A case directory holds:
//   args.txt   first line "op NAME", then one line per argument:
//                tensor NAME DTYPE NDIM D0 D1 ...   (raw contiguous little-endian bytes in NAME.bin)
//                int NAME VALUE | float NAME VALUE | str NAME VALUE | none NAME
//   outputs written by Case::finish(): NAME.out.bin per output, and outputs.txt with one
//   "tensor NAME DTYPE NDIM D0 ..." line each, in the order the op returns them.
// DTYPE is one of f16 bf16 f32 f64 i32 i64 u8 bool.
//
// Outputs the glue allocates with at::empty are filled with 0xFF bytes here (NaN for floats, -1
// for integers), so a kernel that leaves an element unwritten is caught by the comparison; those
// the glue allocates with at::zeros start at 0, as there.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <deque>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace tasksieve {
namespace sim {

inline size_t dtype_bytes(const std::string& dt) {
  if (dt == "f16" || dt == "bf16") return 2;
  if (dt == "f32" || dt == "i32") return 4;
  if (dt == "f64" || dt == "i64") return 8;
  if (dt == "u8" || dt == "bool") return 1;
  throw std::runtime_error("unknown dtype '" + dt + "'");
}

// The simulator's runtime has no cudaGetErrorName/String (calling them aborts), so the codes
// a launcher returns are named here.
inline std::string error_name(cudaError_t err) {
  switch (err) {
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaError " + std::to_string(static_cast<int>(err));
  }
}

inline void check(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) throw std::runtime_error(what + ": " + error_name(err));
}

struct Tensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  void* dev = nullptr;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  size_t bytes() const { return static_cast<size_t>(numel()) * dtype_bytes(dtype); }
  int64_t size(int d) const {
    if (d < 0) d += static_cast<int>(shape.size());
    if (d < 0 || d >= static_cast<int>(shape.size()))
      throw std::runtime_error("tensor " + name + ": no dimension " + std::to_string(d));
    return shape[d];
  }
  int dim() const { return static_cast<int>(shape.size()); }
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(dev);
  }
};

enum class Init { kZero, kGarbage };

class Case {
 public:
  explicit Case(std::string dir) : dir_(std::move(dir)) {
    std::ifstream f(dir_ + "/args.txt");
    if (!f) throw std::runtime_error("cannot read " + dir_ + "/args.txt");
    std::string line;
    while (std::getline(f, line)) {
      if (line.empty()) continue;
      std::istringstream ls(line);
      std::string kind, name;
      ls >> kind >> name;
      if (kind == "op") {
        op_ = name;
      } else if (kind == "tensor") {
        Tensor t;
        t.name = name;
        int nd = 0;
        ls >> t.dtype >> nd;
        t.shape.resize(nd);
        for (int i = 0; i < nd; ++i) ls >> t.shape[i];
        upload(t);
        inputs_[name] = t;
      } else if (kind == "int" || kind == "float" || kind == "str") {
        std::string v;
        ls >> v;
        scalars_[name] = v;
      } else if (kind == "none") {
        nones_[name] = true;
      } else {
        throw std::runtime_error("args.txt: unknown line kind '" + kind + "'");
      }
    }
    if (op_.empty()) throw std::runtime_error(dir_ + "/args.txt has no 'op' line");
  }

  Case(const Case&) = delete;
  Case& operator=(const Case&) = delete;
  ~Case() {
    for (auto& kv : inputs_) cudaFree(kv.second.dev);
    for (auto& t : outputs_) cudaFree(t.dev);
    for (void* p : scratch_) cudaFree(p);
  }

  const std::string& op() const { return op_; }
  bool has(const std::string& name) const { return inputs_.count(name) != 0; }

  // An input tensor (device pointer inside). Throws when it is missing or given as None.
  Tensor& in(const std::string& name) {
    auto it = inputs_.find(name);
    if (it == inputs_.end()) throw std::runtime_error(op_ + ": missing tensor argument " + name);
    return it->second;
  }
  // An optional input: nullptr when passed as None.
  Tensor* opt(const std::string& name) {
    auto it = inputs_.find(name);
    return it == inputs_.end() ? nullptr : &it->second;
  }
  int64_t i(const std::string& name) const { return std::stoll(scalar(name)); }
  double f(const std::string& name) const { return std::stod(scalar(name)); }
  std::string s(const std::string& name) const { return scalar(name); }
  bool b(const std::string& name) const { return i(name) != 0; }
  bool is_none(const std::string& name) const { return nones_.count(name) != 0; }

  // A new output, returned in the order of the calls. kGarbage mirrors at::empty.
  Tensor& out(const std::string& name, const std::string& dtype, std::vector<int64_t> shape,
              Init init) {
    Tensor t;
    t.name = name;
    t.dtype = dtype;
    t.shape = std::move(shape);
    if (t.bytes() > 0) {
      check(cudaMalloc(&t.dev, t.bytes()), "cudaMalloc " + name);
      check(cudaMemset(t.dev, init == Init::kZero ? 0 : 0xFF, t.bytes()), "cudaMemset " + name);
    }
    outputs_.push_back(t);
    return outputs_.back();
  }
  // An input that the op updates in place; its final content is returned as an output.
  Tensor& inout(const std::string& name) {
    Tensor& t = in(name);
    inout_.push_back(name);
    return t;
  }
  // Device workspace that is not returned (mirrors a temporary the glue allocates).
  void* scratch(size_t bytes, Init init) {
    void* p = nullptr;
    if (bytes == 0) return nullptr;
    check(cudaMalloc(&p, bytes), "cudaMalloc scratch");
    check(cudaMemset(p, init == Init::kZero ? 0 : 0xFF, bytes), "cudaMemset scratch");
    scratch_.push_back(p);
    return p;
  }

  // Synchronise, copy every output (and in-place input) back, write the files.
  void finish() {
    check(cudaDeviceSynchronize(), op_ + ": kernel");
    check(cudaGetLastError(), op_ + ": kernel");
    std::ofstream list(dir_ + "/outputs.txt");
    std::vector<const Tensor*> all;
    for (const Tensor& t : outputs_) all.push_back(&t);
    for (const std::string& n : inout_) all.push_back(&inputs_.at(n));
    for (const Tensor* t : all) {
      std::vector<char> host(t->bytes());
      if (t->bytes() > 0)
        check(cudaMemcpy(host.data(), t->dev, t->bytes(), cudaMemcpyDeviceToHost),
              "cudaMemcpy " + t->name);
      std::ofstream o(dir_ + "/" + t->name + ".out.bin", std::ios::binary);
      o.write(host.data(), static_cast<std::streamsize>(host.size()));
      list << "tensor " << t->name << " " << t->dtype << " " << t->shape.size();
      for (int64_t d : t->shape) list << " " << d;
      list << "\n";
    }
  }

 private:
  std::string scalar(const std::string& name) const {
    auto it = scalars_.find(name);
    if (it == scalars_.end()) throw std::runtime_error(op_ + ": missing scalar argument " + name);
    return it->second;
  }

  void upload(Tensor& t) {
    std::ifstream f(dir_ + "/" + t.name + ".bin", std::ios::binary);
    if (!f) throw std::runtime_error("cannot read " + dir_ + "/" + t.name + ".bin");
    std::vector<char> host(t.bytes());
    f.read(host.data(), static_cast<std::streamsize>(host.size()));
    if (static_cast<size_t>(f.gcount()) != host.size())
      throw std::runtime_error(t.name + ".bin is shorter than its shape says");
    if (t.bytes() == 0) return;
    check(cudaMalloc(&t.dev, t.bytes()), "cudaMalloc " + t.name);
    check(cudaMemcpy(t.dev, host.data(), t.bytes(), cudaMemcpyHostToDevice),
          "cudaMemcpy " + t.name);
  }

  std::string dir_, op_;
  std::map<std::string, Tensor> inputs_;
  std::map<std::string, std::string> scalars_;
  std::map<std::string, bool> nones_;
  std::deque<Tensor> outputs_;  // a deque: references handed out by out() stay valid
  std::vector<std::string> inout_;
  std::vector<void*> scratch_;
};

// The main() of every runner: each argument is a case directory; `dispatch(Case&)` runs the
// case's op. A failing case writes "error.txt" in its directory and the runner goes on, so one
// bad case does not hide the others; the exit status is the number of failed cases (capped).
template <typename Dispatch>
int run_cases(int argc, char** argv, Dispatch dispatch) {
  int failed = 0;
  for (int a = 1; a < argc; ++a) {
    const std::string dir = argv[a];
    try {
      Case c(dir);
      dispatch(c);
      c.finish();
    } catch (const std::exception& e) {
      ++failed;
      std::ofstream err(dir + "/error.txt");
      err << e.what() << "\n";
      std::fprintf(stderr, "[sim] %s: %s\n", dir.c_str(), e.what());
      cudaGetLastError();  // clear a sticky launch error so the next case can run
    }
  }
  return failed > 100 ? 100 : failed;
}

}  // namespace sim
}  // namespace tasksieve
