// Runner-side mapping from the case files' dtype names to the launchers' DType tag.
#pragma once

#include <stdexcept>
#include <string>

#include "tasksieve/dtype.cuh"

namespace tasksieve {
namespace sim {

inline DType float_dtype(const std::string& name) {
  if (name == "f32") return DType::kFloat32;
  if (name == "f16") return DType::kFloat16;
  if (name == "bf16") return DType::kBFloat16;
  throw std::runtime_error("expected a f32, f16 or bf16 tensor, got " + name);
}

}  // namespace sim
}  // namespace tasksieve
