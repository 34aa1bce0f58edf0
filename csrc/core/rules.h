// Rules shared by every C++ and CUDA implementation, one definition each: the argument checks of the ext_* operators
// (csrc/aten/aten_ops.cpp), of the torch-free core (sgk::check_params) and of the CUDA launchers all call these.
// Their Python counterparts (sparsegpt_kernels.options for the allowed values, sparsegpt_kernels.reference.n_pruned,
// the cuda backend's block limit) are compared with these through sparsegpt_kernels._C (MIN_QUANT_BITS,
// MAX_QUANT_BITS, CUDA_MAX_BLOCK, valid_damp, valid_sparsity, valid_nm, valid_maxq, n_pruned) in tests/test_rules.py
// and tests/test_cpp_backend.py.
// Torch-free and header-only: the plain-nvcc build of csrc/cuda includes it too. The predicates are constexpr (no
// <cmath>: std::isfinite is not constexpr in C++17), so that they can be checked at compile time as well.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

namespace sgk {

// How many of `count` weights an unstructured block prunes: round-half-up of sparsity * count, clamped to count.
inline int64_t n_pruned(double sparsity, int64_t count) {
  return std::min<int64_t>(count, static_cast<int64_t>(sparsity * static_cast<double>(count) + 0.5));
}

// Widest column block of the fused CUDA sweep kernel (a warp holds one row of the block in registers: 32 values per
// lane).
constexpr int64_t kCudaMaxBlock = 1024;

// Joint quantization: bits per kept weight, inclusive range. The kernels take the grid's top level maxq = 2^bits - 1.
constexpr int kMinQuantBits = 2, kMaxQuantBits = 8;

// Relative damping (λ = damp * mean(diag H) on the diagonal): finite and > 0 (0 would also defeat the retries after a
// failed factorisation, which multiply the damping). Without std::isfinite: NaN fails both comparisons, +inf the
// second; -0.0 is not > 0.
constexpr bool valid_damp(double damp) { return damp > 0 && damp <= std::numeric_limits<double>::max(); }

// Unstructured sparsity (the fraction pruned): 0 <= s < 1. NaN fails; 1 (everything pruned) is not a prune.
constexpr bool valid_sparsity(double sparsity) { return sparsity >= 0 && sparsity < 1; }

// N:M (n kept of every m consecutive columns): 0 < n < m.
constexpr bool valid_nm(int64_t n, int64_t m) { return 0 < n && n < m; }

// The top level of a quantization grid: maxq == 2^b - 1 for some b in [kMinQuantBits, kMaxQuantBits] (3, 7, ..., 255).
constexpr bool valid_maxq(int64_t maxq) {
  for (int b = kMinQuantBits; b <= kMaxQuantBits; ++b) {
    if (maxq == (int64_t{1} << b) - 1) return true;
  }
  return false;
}

}  // namespace sgk
