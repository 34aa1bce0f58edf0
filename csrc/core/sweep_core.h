// Torch-free numeric core of the SparseGPT column sweep (CPU): quantization, N:M and unstructured mask selection,
// and the blocked sweep driver. Used by the ATen operators (csrc/cpu/ops.cpp) and by the C++ unit tests.
//
// Layout: W is (rows, cols) row-major with leading dimension ldw; U is (cols, cols) row-major with leading
// dimension ldu, upper triangular (the upper Cholesky factor of the damped inverse Hessian). Everything follows
// the pure-PyTorch reference (sparsegpt_kernels/reference.py), including its tie-breaking: among equal scores the
// element that comes first (lower column for N:M, lower row-major index inside the block for unstructured) is
// pruned first. Arithmetic is done in T in the same order as the reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace sgk {

// ---------------------------------------------------------------------------------------------------------------
// Quantization: q = scale * (clamp(round(w / scale) + zero, 0, maxq) - zero), round half to even (torch.round).
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
inline T quantize(T w, T scale, T zero, T maxq) {
  T q = std::nearbyint(w / scale) + zero;
  q = std::min(std::max(q, T(0)), maxq);
  return scale * (q - zero);
}

// ---------------------------------------------------------------------------------------------------------------
// N:M selection on one group: pruned[i] = 1 for the m - n lowest scores (stable: earlier index first on ties).
// rank(i) = #{j : s_j < s_i or (s_j == s_i and j < i)}; element i is pruned iff rank(i) < m - n. Exactly the first
// m - n entries of a stable ascending argsort.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
inline void nm_prune_group(const T* s, int64_t n, int64_t m, uint8_t* pruned) {
  const int64_t drop = m - n;
  for (int64_t i = 0; i < m; ++i) {
    int64_t rank = 0;
    const T si = s[i];
    for (int64_t j = 0; j < m; ++j) rank += (s[j] < si) || (s[j] == si && j < i);
    pruned[i] = rank < drop ? 1 : 0;
  }
}

// Keep-mask (1 = kept) of a (rows, cols) row-major score matrix, n kept of every m consecutive columns.
template <typename T>
inline void nm_keep_mask(const T* scores, int64_t rows, int64_t cols, int64_t n, int64_t m, uint8_t* keep) {
  std::vector<uint8_t> pr(static_cast<size_t>(m));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < cols; g += m) {
      nm_prune_group(scores + r * cols + g, n, m, pr.data());
      for (int64_t i = 0; i < m; ++i) keep[r * cols + g + i] = pr[i] ? 0 : 1;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Unstructured selection: pruned[i] = 1 for exactly the k lowest of scores[0..count), ties in index order.
// A selection (nth_element), not a sort. `tmp` must hold `count` values.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
inline void select_k_lowest(const T* scores, int64_t count, int64_t k, uint8_t* pruned, T* tmp) {
  if (k <= 0) {
    std::memset(pruned, 0, static_cast<size_t>(count));
    return;
  }
  if (k >= count) {
    std::memset(pruned, 1, static_cast<size_t>(count));
    return;
  }
  std::copy(scores, scores + count, tmp);
  std::nth_element(tmp, tmp + (k - 1), tmp + count);
  const T thresh = tmp[k - 1];
  int64_t below = 0;
  for (int64_t i = 0; i < count; ++i) {
    const uint8_t b = scores[i] < thresh;
    pruned[i] = b;
    below += b;
  }
  int64_t need = k - below;
  for (int64_t i = 0; i < count && need > 0; ++i) {
    if (scores[i] == thresh) {
      pruned[i] = 1;
      --need;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// What the sweep does. n == 0 (and m == 0) means unstructured with `sparsity`.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
struct SweepParams {
  int64_t rows = 0, cols = 0;
  T* W = nullptr;
  int64_t ldw = 0;
  const T* U = nullptr;
  int64_t ldu = 0;
  double sparsity = 0.0;
  int64_t n = 0, m = 0;
  int64_t block_size = 128;
  // joint quantization (scale == nullptr: none); scale/zero are (rows, cols / group_size) row-major, ld = ldq
  const T* scale = nullptr;
  const T* zero = nullptr;
  int64_t ldq = 0;
  int64_t group_size = 0;
  int64_t maxq = 0;
};

// round-half-up of sparsity * count, clamped to count (reference.n_pruned)
inline int64_t n_pruned(double sparsity, int64_t count) {
  return std::min<int64_t>(count, static_cast<int64_t>(sparsity * static_cast<double>(count) + 0.5));
}

// Validates a parameter set; throws std::invalid_argument naming the problem.
template <typename T>
inline void check_params(const SweepParams<T>& p) {
  auto fail = [](const char* what) { throw std::invalid_argument(what); };
  if (p.rows < 0 || p.cols < 0) fail("negative shape");
  if (p.block_size < 1) fail("block_size must be >= 1");
  if (p.ldw < p.cols || p.ldu < p.cols) fail("leading dimension smaller than cols");
  const bool nm = p.m != 0;
  if (nm) {
    if (!(0 < p.n && p.n < p.m)) fail("N:M needs 0 < N < M");
    if (p.cols % p.m) fail("cols is not a multiple of M");
    if (std::min(p.block_size, p.cols) % p.m) fail("block_size is not a multiple of M");
  } else if (!(p.sparsity >= 0.0 && p.sparsity <= 1.0)) {
    fail("sparsity must be in [0, 1]");
  }
  if (p.scale != nullptr) {
    if (p.zero == nullptr) fail("quantization needs both scale and zero");
    if (p.group_size < 1 || p.cols % p.group_size) fail("group_size must divide cols");
    if (p.ldq < p.cols / p.group_size) fail("quantization leading dimension too small");
    if (p.maxq < 1) fail("maxq must be >= 1");
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Steps 1 (N:M) and 2 of ALGORITHM.md for rows [r0, r1) of the column block [i1, i2).
// Tiles of kRowsPerTile rows are copied into `work` ((kRowsPerTile, B)) and swept column by column while they sit
// in cache (the tile and U[i1:i2, i1:i2] stay in L1/L2 for the whole block). `pruned` is the unstructured mask of the
// block ((rows, B) row-major) or nullptr for N:M. E receives the errors ((rows, B) row-major). Returns Σ err² over
// the rows. `work` holds kRowsPerTile * B values, `nm_pruned` kRowsPerTile * B flags, `nm_scores` m values.
// ---------------------------------------------------------------------------------------------------------------
constexpr int64_t kRowsPerTile = 8;
// Threads only pay off for enough work per chunk: a thread synchronisation costs far more than a small tile.
constexpr int64_t kScoreGrainRows = 512;
constexpr int64_t kSweepGrainElems = int64_t{1} << 21;  // ~ rows * B * B multiply-adds per chunk

// x[k] -= a * y[k] (two roundings per element, like the reference: no fused multiply-add)
template <typename T>
inline void axpy_neg(T* __restrict x, const T* __restrict y, T a, int64_t len) {
  for (int64_t k = 0; k < len; ++k) x[k] -= a * y[k];
}

template <typename T, bool nm, bool quant>
inline double sweep_rows_impl(const SweepParams<T>& p, int64_t i1, int64_t i2, int64_t r0, int64_t r1,
                              const uint8_t* pruned, T* E, T* work, uint8_t* nm_pruned, T* nm_scores) {
  const int64_t B = i2 - i1;
  const T* U = p.U;
  const int64_t ldu = p.ldu;
  const T maxq = static_cast<T>(p.maxq);
  double loss = 0.0;
  for (int64_t t0 = r0; t0 < r1; t0 += kRowsPerTile) {
    const int64_t tr = std::min(kRowsPerTile, r1 - t0);
    for (int64_t t = 0; t < tr; ++t) std::memcpy(work + t * B, p.W + (t0 + t) * p.ldw + i1, sizeof(T) * B);
    for (int64_t j = 0; j < B; ++j) {
      const int64_t col = i1 + j;
      const T* urow = U + col * ldu + i1;  // row j of U1 = U[i1:i2, i1:i2]
      const T dj = urow[j];
      if (nm && j % p.m == 0) {
        // score the group with the current (already updated) weights, per row
        for (int64_t t = 0; t < tr; ++t) {
          const T* w = work + t * B;
          for (int64_t c = 0; c < p.m; ++c) {
            const T dc = U[(col + c) * ldu + col + c];
            nm_scores[c] = (w[j + c] * w[j + c]) / (dc * dc);
          }
          nm_prune_group(nm_scores, p.n, p.m, nm_pruned + t * B + j);
        }
      }
      const int64_t g = quant ? col / p.group_size : 0;
      for (int64_t t = 0; t < tr; ++t) {
        const int64_t row = t0 + t;
        T* w = work + t * B;
        const T wj = w[j];
        const bool prune = nm ? nm_pruned[t * B + j] != 0 : pruned[row * B + j] != 0;
        T q = prune ? T(0) : wj;
        if (quant) q = quantize(q, p.scale[row * p.ldq + g], p.zero[row * p.ldq + g], maxq);
        const T err = (wj - q) / dj;
        loss += static_cast<double>(err) * static_cast<double>(err);
        w[j] = q;
        E[row * B + j] = err;
        axpy_neg(w + j + 1, urow + j + 1, err, B - j - 1);
      }
    }
    for (int64_t t = 0; t < tr; ++t) std::memcpy(p.W + (t0 + t) * p.ldw + i1, work + t * B, sizeof(T) * B);
  }
  return loss;
}

// sweep_rows_impl with the mode resolved at compile time (no per-element branches on it)
template <typename T>
inline double sweep_rows(const SweepParams<T>& p, int64_t i1, int64_t i2, int64_t r0, int64_t r1,
                         const uint8_t* pruned, T* E, T* work, uint8_t* nm_pruned, T* nm_scores) {
  const bool nm = p.m != 0, quant = p.scale != nullptr;
  if (nm) {
    return quant ? sweep_rows_impl<T, true, true>(p, i1, i2, r0, r1, pruned, E, work, nm_pruned, nm_scores)
                 : sweep_rows_impl<T, true, false>(p, i1, i2, r0, r1, pruned, E, work, nm_pruned, nm_scores);
  }
  return quant ? sweep_rows_impl<T, false, true>(p, i1, i2, r0, r1, pruned, E, work, nm_pruned, nm_scores)
               : sweep_rows_impl<T, false, false>(p, i1, i2, r0, r1, pruned, E, work, nm_pruned, nm_scores);
}

// ---------------------------------------------------------------------------------------------------------------
// The whole blocked sweep. `parallel(ntasks, grain, fn)` runs fn(begin, end) over [0, ntasks), possibly on several
// threads, in non-overlapping ranges of at least `grain` tasks (fewer tasks than `grain`: one call, no threads);
// `gemm_update(i1, i2, E)` must do W[:, i2:] -= E @ U[i1:i2, i2:] with E (rows, i2 - i1) row-major.
// Returns the OBS loss Σ err² / 2.
// ---------------------------------------------------------------------------------------------------------------
template <typename T, typename Parallel, typename Gemm>
double sweep(const SweepParams<T>& p, Parallel&& parallel, Gemm&& gemm_update) {
  check_params(p);
  if (p.rows == 0 || p.cols == 0) return 0.0;
  const int64_t Bmax = std::min(p.block_size, p.cols);
  const bool nm = p.m != 0;
  std::vector<T> E(static_cast<size_t>(p.rows * Bmax));
  std::vector<uint8_t> mask(nm ? 0 : static_cast<size_t>(p.rows * Bmax));
  std::vector<T> scores(nm ? 0 : static_cast<size_t>(p.rows * Bmax));
  std::vector<T> tmp(nm ? 0 : static_cast<size_t>(p.rows * Bmax));
  const int64_t ntiles = (p.rows + kRowsPerTile - 1) / kRowsPerTile;
  std::vector<double> partial(static_cast<size_t>(ntiles));
  double loss = 0.0;
  for (int64_t i1 = 0; i1 < p.cols; i1 += Bmax) {
    const int64_t i2 = std::min(i1 + Bmax, p.cols);
    const int64_t B = i2 - i1;
    if (!nm) {
      // step 1: one threshold over the whole (rows, B) block, scores from the current weights
      parallel(p.rows, kScoreGrainRows, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const T* w = p.W + r * p.ldw + i1;
          T* s = scores.data() + r * B;
          for (int64_t j = 0; j < B; ++j) {
            const T d = p.U[(i1 + j) * p.ldu + i1 + j];
            s[j] = (w[j] * w[j]) / (d * d);
          }
        }
      });
      select_k_lowest(scores.data(), p.rows * B, n_pruned(p.sparsity, p.rows * B), mask.data(), tmp.data());
    }
    // step 2: row tiles through the whole block
    const int64_t tile_grain = std::max<int64_t>(1, kSweepGrainElems / (kRowsPerTile * B * B));
    parallel(ntiles, tile_grain, [&](int64_t b, int64_t e) {
      std::vector<T> work(static_cast<size_t>(kRowsPerTile * B));
      std::vector<uint8_t> nmp(nm ? static_cast<size_t>(kRowsPerTile * B) : 0);
      std::vector<T> nms(nm ? static_cast<size_t>(p.m) : 0);
      for (int64_t t = b; t < e; ++t) {
        const int64_t r0 = t * kRowsPerTile, r1 = std::min(p.rows, r0 + kRowsPerTile);
        partial[t] = sweep_rows(p, i1, i2, r0, r1, nm ? nullptr : mask.data(), E.data(), work.data(), nmp.data(),
                                nms.data());
      }
    });
    for (double v : partial) loss += v;
    // step 3: lazy batch update of everything to the right
    if (i2 < p.cols) gemm_update(i1, i2, static_cast<const T*>(E.data()));
  }
  return loss / 2;
}

}  // namespace sgk
