// CUDA kernels of the sparsegpt_kernels::ext_* operators: launchers over raw pointers and a stream.
// No torch headers: sweep_kernels.cu compiles with plain nvcc; register_cuda.cpp (ATen) calls these.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../core/rules.h"

namespace sgk_cuda {

// Everything one column block [i1, i2) of the sweep needs (step 1 for N:M, and step 2, of docs/algorithm.md,
// "The blocked sweep").
// W (rows, ldw) and U (cols, ldu) are row-major; `pruned` is the unstructured mask of the block ((rows, i2 - i1)
// row-major, 1 = pruned) or nullptr for N:M (n, m > 0). E receives the errors ((rows, i2 - i1) row-major);
// row_loss[r] += Σ_j err² for each row. Quantization is off when scale == nullptr.
template <typename T>
struct BlockArgs {
  T* W;
  int64_t ldw;
  const T* U;
  int64_t ldu;
  int64_t rows;
  int64_t i1, i2;
  const uint8_t* pruned;
  int n, m;
  const T* scale;
  const T* zero;
  int64_t ldq;
  int64_t group_size;
  int maxq;
  T* E;
  T* row_loss;
};

// Largest block the fused kernel takes: the rule sgk::kCudaMaxBlock of csrc/core/rules.h (one definition for the
// kernels, the ATen checks and sparsegpt_kernels._C.CUDA_MAX_BLOCK).
constexpr int64_t kMaxBlock = sgk::kCudaMaxBlock;

// One warp per row: the row's block stays in registers for all of its B rank-1 updates.
template <typename T>
cudaError_t launch_sweep_block(const BlockArgs<T>& a, cudaStream_t stream);

// keep (rows, cols) row-major, 1 = kept: n kept of every m consecutive entries of each row of scores (row-major),
// the m - n lowest pruned, earlier entries first on ties.
template <typename T>
cudaError_t launch_nm_keep_mask(const T* scores, int64_t rows, int64_t cols, int n, int m, uint8_t* keep,
                                cudaStream_t stream);

}  // namespace sgk_cuda
