// Rules shared by every C++ and CUDA implementation, one definition each. Their Python counterparts
// (sparsegpt_kernels.reference.n_pruned, the cuda backend's block limit) are compared with these through
// sparsegpt_kernels._C (n_pruned, CUDA_MAX_BLOCK) in tests/test_cpp_backend.py.
#pragma once

#include <algorithm>
#include <cstdint>

namespace sgk {

// How many of `count` weights an unstructured block prunes: round-half-up of sparsity * count, clamped to count.
inline int64_t n_pruned(double sparsity, int64_t count) {
  return std::min<int64_t>(count, static_cast<int64_t>(sparsity * static_cast<double>(count) + 0.5));
}

// Widest column block of the fused CUDA sweep kernel (a warp holds one row of the block in registers: 32 values per
// lane).
constexpr int64_t kCudaMaxBlock = 1024;

}  // namespace sgk
