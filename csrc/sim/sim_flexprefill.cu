// Simulator runner for the FlexPrefill ops: each case directory names an op and holds its
// arguments (csrc/sim/sim_io.h); the op runs through the same header launcher as the CUDA glue
// in csrc/cuda/flexprefill_*.cu, with the same output allocation.
#include <string>

#include "sim_dtype.h"
#include "sim_io.h"
#include "tasksieve/js_divergence.cuh"

namespace tasksieve {
namespace sim {
namespace {

// js_divergence(p, q, eps) -> fp32 [...]; the glue casts fp64 to fp32 first (the caller does).
void js_divergence(Case& c) {
  Tensor& p = c.in("p");
  Tensor& q = c.in("q");
  std::vector<int64_t> shape = p.shape;
  const int64_t n = shape.back();
  shape.pop_back();
  Tensor& out = c.out("out", "f32", shape, Init::kGarbage);
  const int64_t rows = out.numel();
  if (rows == 0) return;
  check(DispatchFloat(float_dtype(p.dtype),
                      [&](auto tag) {
                        using T = typename decltype(tag)::type;
                        return JsDivergence<T>(p.ptr<T>(), q.ptr<T>(), out.ptr<float>(), rows, n,
                                               static_cast<float>(c.f("eps")), 0);
                      }),
        "JsDivergence");
}

void dispatch(Case& c) {
  const std::string& op = c.op();
  if (op == "js_divergence") return js_divergence(c);
  throw std::runtime_error("sim_flexprefill: unknown op " + op);
}

}  // namespace
}  // namespace sim
}  // namespace tasksieve

int main(int argc, char** argv) { return tasksieve::sim::run_cases(argc, argv, tasksieve::sim::dispatch); }
