// Torch-free numeric core of the SparseGPT column sweep (CPU): quantization, N:M and unstructured mask selection,
// and the blocked sweep driver. Used by the ATen operators (csrc/cpu/ops.cpp) and by the C++ unit tests.
//
// Layout: W is (rows, cols) row-major with leading dimension ldw; the factor G is (cols, cols) row-major, upper
// triangular: U (the upper Cholesky factor of the damped inverse Hessian) or R (H = R Rᵀ; see Factor). Everything
// follows the pure-PyTorch reference (sparsegpt_kernels/reference.py), including its tie-breaking: among equal
// scores the element that comes first (lower column for N:M, lower row-major index inside the block for
// unstructured) is pruned first. Driven by U, the in-block arithmetic is the reference's, operation for operation.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "big_buffer.h"
#include "rules.h"

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

// nm_prune_group's keep-mask for `groups` consecutive groups of a compile-time M (M = 4, 8: the refinement's
// projection calls this every iteration): the rank loop unrolled and without branches, the same ranks (for j < i
// the tie counts, so (s_j <= s_i); for j > i only s_j < s_i).
template <int M, typename T>
inline void nm_keep_groups_fixed(const T* scores, int64_t groups, int64_t n, uint8_t* keep) {
  const int drop = static_cast<int>(M - n);
  for (int64_t g = 0; g < groups; ++g) {
    T v[M];
    for (int i = 0; i < M; ++i) v[i] = scores[g * M + i];
    for (int i = 0; i < M; ++i) {
      int rank = 0;
      for (int j = 0; j < i; ++j) rank += static_cast<int>(v[j] <= v[i]);
      for (int j = i + 1; j < M; ++j) rank += static_cast<int>(v[j] < v[i]);
      keep[g * M + i] = static_cast<uint8_t>(rank >= drop);
    }
  }
}

// Keep-mask (1 = kept) of a (rows, cols) row-major score matrix, n kept of every m consecutive columns (cols a
// multiple of m, so the groups of all rows lie one after another).
template <typename T>
inline void nm_keep_mask(const T* scores, int64_t rows, int64_t cols, int64_t n, int64_t m, uint8_t* keep) {
  if (m == 4) return nm_keep_groups_fixed<4>(scores, rows * cols / 4, n, keep);
  if (m == 8) return nm_keep_groups_fixed<8>(scores, rows * cols / 8, n, keep);
  std::vector<uint8_t> pr(static_cast<size_t>(m));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < cols; g += m) {
      nm_prune_group(scores + r * cols + g, n, m, pr.data());
      for (int64_t i = 0; i < m; ++i) keep[r * cols + g + i] = pr[i] ? 0 : 1;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The factor that drives the sweep. Both run the same algorithm (docs/algorithm.md, "The blocked sweep"; the
// derivation below is summarised there in "The Cholesky-factor sweep"), with the same weights at the start of every
// block and the same in-block steps, up to rounding.
//
// kInverse:  G = U, the upper Cholesky factor of H^-1 (H^-1 = U^T U). The reference, step for step: in the block,
//            err = (w - q) / U_jj and W[:, j+1:i2] -= err * U[j, j+1:i2]; then W[:, i2:] -= E @ U[blk, i2:].
// kCholesky: G = R, the upper triangular factor with H = R R^T (the reversed Cholesky factor; U = R^-1). No
//            inverse of R is formed: with D = W0 - Q (the total change of the finished columns, W0 the ORIGINAL
//            weights), the reference's weights at the start of a block are
//              W_blk = W0_blk + (D_done @ R[done, blk]) @ inv(R[blk, blk]),
//            because U[done, rest] = -inv(R_done) R[done, rest] inv(R_rest) and E_done = D_done R[done, done], and
//            inv(R[blk, blk]) is exactly U[blk, blk], the block of U the in-block steps use. So the sweep keeps
//            A = D_done @ R[done, :] in a buffer (rows, cols) updated by one GEMM per block, forms W_blk with a
//            (rows, B) x (B, B) GEMM, and runs the in-block steps with inv(R[blk, blk]) (B^3/3 per block). The
//            factorisation costs c^3/3 instead of 2c^3/3, and the coupling between blocks never goes through an
//            explicit inverse.
// ---------------------------------------------------------------------------------------------------------------
enum class Factor { kInverse, kCholesky };

// Instruction sets the in-block steps are compiled for: the baseline of the build target, and (x86-64 with GCC or
// Clang) copies for AVX2 and AVX-512 chosen at run time (see sweep_tile_dispatch).
enum class Simd { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// What the sweep does. n == 0 (and m == 0) means unstructured with `sparsity`.
template <typename T>
struct SweepParams {
  int64_t rows = 0, cols = 0;
  T* W = nullptr;  // (rows, cols), leading dimension ldw: the weights in, the pruned weights out
  int64_t ldw = 0;
  const T* G = nullptr;  // (cols, cols) upper triangular, leading dimension ldg: U or R (see Factor)
  int64_t ldg = 0;
  Factor factor = Factor::kInverse;
  T* A = nullptr;  // kCholesky with more than one block: scratch of (rows, cols), leading dimension lda
  int64_t lda = 0;
  double sparsity = 0.0;
  int64_t n = 0, m = 0;
  int64_t block_size = 128;
  // joint quantization (scale == nullptr: none); scale/zero are (rows, cols / group_size) row-major, ld = ldq
  const T* scale = nullptr;
  const T* zero = nullptr;
  int64_t ldq = 0;
  int64_t group_size = 0;
  int64_t maxq = 0;
  // where the time went (seconds added per phase, see Phase), or nullptr
  double* phase_seconds = nullptr;
  // the widest vector instructions the in-block steps may use (the CPU may have less), see sweep_tile_dispatch; the
  // results are the same bit for bit
  Simd simd = Simd::kAvx512;
};

// The phases of the sweep, for SweepParams::phase_seconds: kBlockStart: the block's weights at its start and its
// (B, B) factor block (kCholesky: the triangular inverse of R's block and the (rows, B) x (B, B) GEMM); kSelect: the
// unstructured scores and threshold; kTiles: the in-block steps (N:M selection, pruning, quantization, updates);
// kLazy: the lazy batch update GEMM of everything right of the block.
enum Phase { kBlockStart = 0, kSelect = 1, kTiles = 2, kLazy = 3, kNumPhases = 4 };

// Adds the seconds since the last call to one phase of `sink` (a no-op without a sink).
class PhaseClock {
 public:
  explicit PhaseClock(double* sink) : sink_(sink), last_(sink ? std::chrono::steady_clock::now() : Clock::time_point()) {}
  void lap(Phase phase) {
    if (sink_ == nullptr) return;
    const auto now = Clock::now();
    sink_[phase] += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }

 private:
  using Clock = std::chrono::steady_clock;
  double* sink_;
  Clock::time_point last_;
};

// Validates a parameter set; throws std::invalid_argument naming the problem. The value rules are those of rules.h.
// The ATen operators check the same before they get here, with messages that name the operator and the value.
template <typename T>
inline void check_params(const SweepParams<T>& p) {
  auto fail = [](const char* what) { throw std::invalid_argument(what); };
  if (p.rows < 0 || p.cols < 0) fail("negative shape");
  if (p.block_size < 1) fail("block_size must be >= 1");
  if (p.ldw < p.cols || p.ldg < p.cols) fail("leading dimension smaller than cols");
  if (p.G == nullptr && p.cols > 0) fail("no factor");
  if (p.factor == Factor::kCholesky && p.cols > p.block_size && (p.A == nullptr || p.lda < p.cols)) {
    fail("the Cholesky-driven sweep needs scratch A with lda >= cols");
  }
  const bool nm = p.m != 0;
  if (nm) {
    if (!valid_nm(p.n, p.m)) fail("N:M needs 0 < N < M");
    if (p.cols % p.m) fail("cols is not a multiple of M");
    if (std::min(p.block_size, p.cols) % p.m) fail("block_size is not a multiple of M");
  } else if (!valid_sparsity(p.sparsity)) {
    fail("sparsity must be in [0, 1)");
  }
  if (p.scale != nullptr) {
    if (p.zero == nullptr) fail("quantization needs both scale and zero");
    if (p.group_size < 1 || p.cols % p.group_size) fail("group_size must divide cols");
    if (p.ldq < p.cols / p.group_size) fail("quantization leading dimension too small");
    if (!valid_maxq(p.maxq)) fail("maxq must be 2^bits - 1 for bits in kMinQuantBits..kMaxQuantBits");
  }
}

// Ui = inverse of the upper triangular (B, B) block R (leading dimension ldr), into Ui (B, B) row-major with zeros
// below the diagonal, columns [k0, k1) only. Back substitution per column in double, rounded once.
template <typename T>
inline void upper_inverse_columns(const T* R, int64_t ldr, int64_t B, int64_t k0, int64_t k1, T* Ui) {
  std::vector<double> x(static_cast<size_t>(B));
  for (int64_t k = k0; k < k1; ++k) {
    for (int64_t i = k; i >= 0; --i) {
      double acc = i == k ? 1.0 : 0.0;
      for (int64_t l = i + 1; l <= k; ++l) acc -= static_cast<double>(R[i * ldr + l]) * x[l];
      x[i] = acc / static_cast<double>(R[i * ldr + i]);
    }
    for (int64_t i = 0; i < B; ++i) Ui[i * B + k] = i <= k ? static_cast<T>(x[i]) : T(0);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Exact unstructured selection over a whole block, in parallel: the k lowest of the block's (rows, B) scores
// (non-negative), ties in row-major order (the first ones in index order are pruned). A radix select on the scores'
// bit patterns (for non-negative IEEE values their order as unsigned integers): one pass over the rows computes the
// scores and a histogram of their top 16 bits (one per chunk of rows); a second pass computes them again and keeps
// the few that share the k-th score's top bits (with their indices, in index order); the other bits are settled on
// those alone. The scores are never stored: the in-block steps compute them again from the same weights, and the
// outcome is a Threshold, not a mask.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
using score_key_t = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;

template <typename T>
inline score_key_t<T> score_key(T x) {
  score_key_t<T> k;
  std::memcpy(&k, &x, sizeof(T));
  return k;
}

// The key of a score of any sign, in the scores' order (negative scores below zero; -0 as +0; NaN above +inf):
// what a selection over scores that may be negative sorts by instead of score_key.
template <typename T>
struct SignedScoreKey {
  score_key_t<T> operator()(T x) const {
    using K = score_key_t<T>;
    constexpr K sign = K{1} << (sizeof(K) * 8 - 1);
    const K k = score_key(x == T(0) ? T(0) : x);
    return (k & sign) ? static_cast<K>(~k) : static_cast<K>(k | sign);
  }
};

template <typename T>
struct ScoreKey {
  score_key_t<T> operator()(T x) const { return score_key(x); }
};

// What an unstructured selection decided, for the block's entries i = row * B + j: i is pruned iff its score's key
// is below `key`, or equal to it with i <= last_tie (the ties at the threshold go in index order).
template <typename T>
struct Threshold {
  score_key_t<T> key = 0;
  int64_t last_tie = -1;
  bool prunes(score_key_t<T> k, int64_t i) const { return k < key || (k == key && i <= last_tie); }
};

// Buffers of select_threshold, kept from block to block.
template <typename T>
struct SelectScratch {
  std::vector<uint32_t> hist;            // (chunks, kSelectBins)
  std::vector<int64_t> low_hist;         // (kSelectBins): the candidates' lower bits
  std::vector<score_key_t<T>> keys;      // candidates: keys and indices, in index order
  std::vector<int64_t> idx;
};

constexpr int kSelectBits = 16;
constexpr int64_t kSelectBins = int64_t{1} << kSelectBits;

// `row_scores(r, out)` writes the B scores of row r to out. `parallel` as for sweep (below). `key_of` maps a score
// to its key (ScoreKey: non-negative scores; SignedScoreKey: any sign); Threshold::prunes then takes the same keys.
template <typename T, typename RowScores, typename Parallel, typename KeyOf = ScoreKey<T>>
Threshold<T> select_threshold(int64_t rows, int64_t B, int64_t k, RowScores&& row_scores, SelectScratch<T>& s,
                              Parallel&& parallel, KeyOf key_of = {}) {
  using K = score_key_t<T>;
  const int64_t count = rows * B;
  Threshold<T> out;
  if (k <= 0 || count == 0) return out;  // key 0, no ties: nothing below
  if (k >= count) {
    out.key = std::numeric_limits<K>::max();
    out.last_tie = count;
    return out;
  }
  constexpr int kKeyBits = static_cast<int>(sizeof(K) * 8);
  constexpr int shift = kKeyBits - kSelectBits;
  // chunks of rows, each with its own histogram; fewer than 2^32 entries per chunk (uint32 bins)
  int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(8, rows / 1024));
  nchunks = std::max<int64_t>(nchunks, count / (int64_t{1} << 31) + 1);
  nchunks = std::min(nchunks, rows);
  const int64_t chunk_rows = (rows + nchunks - 1) / nchunks;
  nchunks = (rows + chunk_rows - 1) / chunk_rows;
  s.hist.resize(static_cast<size_t>(nchunks * kSelectBins));
  parallel(nchunks, 1, [&](int64_t b, int64_t e) {
    std::vector<T> sc(static_cast<size_t>(B));
    for (int64_t c = b; c < e; ++c) {
      uint32_t* h = s.hist.data() + c * kSelectBins;
      std::fill(h, h + kSelectBins, 0u);
      for (int64_t r = c * chunk_rows, r1 = std::min(rows, r + chunk_rows); r < r1; ++r) {
        row_scores(r, sc.data());
        for (int64_t j = 0; j < B; ++j) ++h[key_of(sc[j]) >> shift];
      }
    }
  });
  int64_t kk = k;  // rank (1-based) of the k-th key among the keys of the current bucket
  K digit = 0;
  for (;; ++digit) {
    int64_t h = 0;
    for (int64_t c = 0; c < nchunks; ++c) h += s.hist[c * kSelectBins + digit];
    if (h >= kk) break;
    kk -= h;
  }
  // the bucket's keys and indices, chunk c from offset[c] on
  std::vector<int64_t> offset(static_cast<size_t>(nchunks + 1), 0);
  for (int64_t c = 0; c < nchunks; ++c) offset[c + 1] = offset[c] + s.hist[c * kSelectBins + digit];
  int64_t n = offset[nchunks];
  s.keys.resize(static_cast<size_t>(n));
  s.idx.resize(static_cast<size_t>(n));
  parallel(nchunks, 1, [&](int64_t b, int64_t e) {
    std::vector<T> sc(static_cast<size_t>(B));
    for (int64_t c = b; c < e; ++c) {
      int64_t o = offset[c];
      for (int64_t r = c * chunk_rows, r1 = std::min(rows, r + chunk_rows); r < r1; ++r) {
        row_scores(r, sc.data());
        for (int64_t j = 0; j < B; ++j) {
          const K key = key_of(sc[j]);
          if ((key >> shift) == digit) {
            s.keys[o] = key;
            s.idx[o] = r * B + j;
            ++o;
          }
        }
      }
    }
  });
  // the lower bits, 16 at a time, on the candidates alone (kept in index order)
  std::vector<int64_t>& hist = s.low_hist;
  hist.resize(static_cast<size_t>(kSelectBins));
  for (int lo = shift - kSelectBits; lo >= 0; lo -= kSelectBits) {
    std::fill(hist.begin(), hist.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++hist[(s.keys[i] >> lo) & (kSelectBins - 1)];
    K d = 0;
    for (; hist[d] < kk; ++d) kk -= hist[d];
    int64_t m = 0;  // keep the digit's candidates, in place and in order (m <= i)
    for (int64_t i = 0; i < n; ++i) {
      if (((s.keys[i] >> lo) & (kSelectBins - 1)) == d) {
        s.keys[m] = s.keys[i];
        s.idx[m] = s.idx[i];
        ++m;
      }
    }
    n = m;
  }
  // every candidate left has the k-th key; the first kk of them (in index order) are pruned
  out.key = s.keys[0];
  out.last_tie = s.idx[kk - 1];
  return out;
}

// Keep-mask (1 = kept) of a (rows, cols) row-major score matrix of any sign, unstructured: in every block of
// `block_size` columns (the last one narrower) over all rows, exactly n_pruned(sparsity, rows * B) of the lowest
// scores pruned, ties in the block's row-major order (sparsegpt_kernels.reference.unstructured_prune_mask per block,
// as the refinement's projection calls it). Blocks [blk0, blk1) only; one radix selection per block.
template <typename T>
inline void unstructured_keep_mask(const T* scores, int64_t rows, int64_t cols, double sparsity, int64_t block_size,
                                   int64_t blk0, int64_t blk1, uint8_t* keep) {
  SelectScratch<T> scratch;
  const SignedScoreKey<T> key_of;
  auto serial = [](int64_t ntasks, int64_t, auto&& fn) { fn(int64_t{0}, ntasks); };
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t i1 = blk * block_size, B = std::min(block_size, cols - i1);
    auto row_scores = [&](int64_t r, T* out) { std::copy(scores + r * cols + i1, scores + r * cols + i1 + B, out); };
    const Threshold<T> thr =
        select_threshold<T>(rows, B, n_pruned(sparsity, rows * B), row_scores, scratch, serial, key_of);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < B; ++j) {
        keep[r * cols + i1 + j] = thr.prunes(key_of(scores[r * cols + i1 + j]), r * B + j) ? 0 : 1;
      }
    }
  }
}

// Rows per tile, L: the SIMD lanes of the in-block steps. A tile is stored column-major ((B, L): the L rows of one
// column are contiguous), so the in-block updates run across rows, L at a time, whatever the remaining length of
// the block. 16 floats fill one AVX-512 register; AVX2 and the baseline build run 8 (one 256-bit or two 128-bit
// registers: a 16-lane vector there spills to the stack, measured 40% slower in cache).
inline int64_t lanes_for(Simd simd) { return simd == Simd::kAvx512 ? 16 : 8; }
// Threads only pay off for enough work per chunk: a thread synchronisation costs far more than a small tile.
constexpr int64_t kScoreGrainRows = 512;
constexpr int64_t kSweepGrainElems = int64_t{1} << 21;  // ~ rows * B * B / 2 multiply-adds per chunk
// Columns whose lazy update goes out as one GEMM (kCholesky). 1024 against 512, same minutes, 2 cores: the lazy
// phase 1.69-1.83 s against 1.81-1.83 s at 4096x11008, 0.666 against 0.69 s at 11008x4096.
constexpr int64_t kLazyWidth = 1024;

// L values as one SIMD value. With GCC/Clang vector extensions the compiler maps it onto the target's vector
// registers; elsewhere a plain loop the compiler may vectorise.
#if defined(__GNUC__) || defined(__clang__)
template <typename T, int L>
struct LaneVec {
  typedef T type __attribute__((vector_size(sizeof(T) * L)));
};

// work[k] += p[0] * g[0][k], then += p[1] * g[1][k], ... (in that order, two roundings each) for k in [k0, k1);
// work and p hold L values per column / per factor row.
template <typename T, int C, int L>
inline void lane_update(T* work, const T* const* g, const T* p, int64_t k0, int64_t k1) {
  using V = typename LaneVec<T, L>::type;
  V pv[C];
  for (int c = 0; c < C; ++c) std::memcpy(&pv[c], p + c * L, sizeof(V));
  for (int64_t k = k0; k < k1; ++k) {
    V w;
    std::memcpy(&w, work + k * L, sizeof(V));
    for (int c = 0; c < C; ++c) w += pv[c] * g[c][k];
    std::memcpy(work + k * L, &w, sizeof(V));
  }
}
#else
template <typename T, int C, int L>
inline void lane_update(T* work, const T* const* g, const T* p, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k) {
    T* w = work + k * L;
    for (int c = 0; c < C; ++c) {
      const T gk = g[c][k];
      for (int64_t t = 0; t < L; ++t) w[t] += p[c * L + t] * gk;
    }
  }
}
#endif

// One column of a tile for L rows, one lane at a time (with quantization: q is w or 0, rounded onto the row's
// grid qs/qz): err = (w - q) / d, loss += err² (in double), pc = -err, the column becomes q, pt = W0 - q (kCholesky)
// or -err.
template <typename T, bool chol, bool quant, int L>
inline void prune_lanes_scalar(T* wj, const uint8_t* pr, T d, const T* oj, T* pc, T* pt, double* loss, const T* qs,
                               const T* qz, T maxq) {
  for (int64_t t = 0; t < L; ++t) {
    const T w = wj[t];
    T q = pr[t] ? T(0) : w;
    if (quant) q = quantize(q, qs[t], qz[t], maxq);
    const T err = (w - q) / d;
    loss[t] += static_cast<double>(err) * static_cast<double>(err);
    pc[t] = -err;  // w_k += (-err) * U_jk  ==  w_k -= err * U_jk, bit for bit
    wj[t] = q;
    pt[t] = chol ? oj[t] - q : -err;
  }
}

// One column of a tile without quantization, for L rows: q = pruned ? 0 : w, err = (w - q) / d, loss += err²
// (in double), and the results: pc = -err, the column becomes q, pt = W0 - q (kCholesky) or -err. Whole-vector
// loads and stores (the next lane_update reads pc as one vector: scalar stores there would stall store-to-load
// forwarding), the same roundings as one lane at a time.
#if defined(__GNUC__) || defined(__clang__)
template <typename T, int L>
struct LaneMask {
  using I = typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type;
  typedef I type __attribute__((vector_size(sizeof(T) * L)));
};

// The keys of L scores (score_key of each lane) as one vector.
template <typename T, int L>
struct LaneKey {
  typedef score_key_t<T> type __attribute__((vector_size(sizeof(T) * L)));
};

template <typename T, bool chol, int L>
inline void prune_lanes(T* wj, const uint8_t* pr, T d, const T* oj, T* pc, T* pt, double* loss) {
  using V = typename LaneVec<T, L>::type;
  using M = typename LaneMask<T, L>::type;
  using LaneDouble = typename LaneVec<double, L>::type;
  V w, o = {};
  std::memcpy(&w, wj, sizeof(V));
  M pruned;
  for (int64_t t = 0; t < L; ++t) pruned[t] = pr[t] ? -1 : 0;
  const V zero = {};
  const V q = pruned ? zero : w;
  const V err = (w - q) / d;
  const LaneDouble e = __builtin_convertvector(err, LaneDouble);
  LaneDouble acc;
  std::memcpy(&acc, loss, sizeof(acc));
  acc += e * e;
  std::memcpy(loss, &acc, sizeof(acc));
  const V neg = -err;
  std::memcpy(pc, &neg, sizeof(V));
  std::memcpy(wj, &q, sizeof(V));
  if (chol) {
    std::memcpy(&o, oj, sizeof(V));
    const V diff = o - q;
    std::memcpy(pt, &diff, sizeof(V));
  } else {
    std::memcpy(pt, &neg, sizeof(V));
  }
}
#else
template <typename T, bool chol, int L>
inline void prune_lanes(T* wj, const uint8_t* pr, T d, const T* oj, T* pc, T* pt, double* loss) {
  prune_lanes_scalar<T, chol, false, L>(wj, pr, d, oj, pc, pt, loss, nullptr, nullptr, T(0));
}
#endif

// The unstructured mask of one tile from its weights at the block start (work, (B, L)), the block's factor (its
// diagonal d_j) and the block's Threshold: flags[j * L + t] = 1 where the selection prunes row r0 + t, column j. The
// scores are (w * w) / (d * d), with the roundings of the row scores the selection ranked, so both agree exactly.
template <typename T, int L>
inline void threshold_lanes(const T* work, const T* Ub, int64_t ldub, int64_t B, int64_t r0, const Threshold<T>& thr,
                            uint8_t* flags) {
  using K = score_key_t<T>;
  int64_t j = 0;
#if defined(__GNUC__) || defined(__clang__)
  using V = typename LaneVec<T, L>::type;
  using KV = typename LaneKey<T, L>::type;
  using LaneBytes = typename LaneVec<uint8_t, L>::type;
  KV tk;
  for (int64_t t = 0; t < L; ++t) tk[t] = thr.key;
  for (; j < B; ++j) {
    const T d = Ub[j * ldub + j];
    const T dd = d * d;
    V w;
    std::memcpy(&w, work + j * L, sizeof(V));
    const V sc = (w * w) / dd;
    KV key;
    std::memcpy(&key, &sc, sizeof(V));
    // whole-vector compares narrowed to one byte per lane (lane by lane, the extracts cost more than the division)
    const LaneBytes below = __builtin_convertvector((key < tk) & 1, LaneBytes);
    const LaneBytes at = __builtin_convertvector((key == tk) & 1, LaneBytes);
    std::memcpy(flags + j * L, &below, L);
    uint64_t words[(L + 7) / 8] = {};
    std::memcpy(words, &at, L);
    uint64_t tie = 0;
    for (uint64_t w8 : words) tie |= w8;
    if (tie != 0) {  // rare: the threshold's own value, decided by index
      for (int64_t t = 0; t < L; ++t) {
        if (at[t]) flags[j * L + t] = thr.prunes(key[t], (r0 + t) * B + j);
      }
    }
  }
#endif
  for (; j < B; ++j) {
    const T d = Ub[j * ldub + j];
    const T dd = d * d;
    for (int64_t t = 0; t < L; ++t) {
      const T w = work[j * L + t];
      const K key = score_key((w * w) / dd);
      flags[j * L + t] = thr.prunes(key, (r0 + t) * B + j);
    }
  }
}

// Moving a tile between rows and lanes: `in` reads L rows (row t at rows[t] + k) into the tile layout
// (tile[k * L + t]), `out` writes the tile back into the rows, for the columns [0, B) and the first tr rows (the
// other lanes of `in` become zeros). With vector extensions, full tiles go through (L, L) squares transposed in
// registers: log2(L) rounds of two-input shuffles that swap the off-diagonal halves of ever smaller blocks (one
// vpermt2ps each on AVX-512), instead of L scalar loads and stores per column.
#if defined(__GNUC__) || defined(__clang__)
template <typename T, int L, int64_t d, size_t... K>
inline void swap_blocks(typename LaneVec<T, L>::type& a, typename LaneVec<T, L>::type& b,
                        std::index_sequence<K...>) {
  using V = typename LaneVec<T, L>::type;
  constexpr int64_t n = L;
#if defined(__clang__) || __GNUC__ >= 12
  const V lo = __builtin_shufflevector(a, b, ((K & d) ? n + K - d : K)...);
  const V hi = __builtin_shufflevector(a, b, ((K & d) ? n + K : K + d)...);
#else
  using M = typename LaneMask<T, L>::type;
  const V lo = __builtin_shuffle(a, b, M{((K & d) ? n + K - d : K)...});
  const V hi = __builtin_shuffle(a, b, M{((K & d) ? n + K : K + d)...});
#endif
  a = lo;
  b = hi;
}

// r[t] becomes column t of the (L, L) square whose rows r held.
template <typename T, int L, int64_t d>
inline void transpose_round(typename LaneVec<T, L>::type* r) {
  for (int64_t i = 0; i < L; ++i) {
    if (!(i & d)) swap_blocks<T, L, d>(r[i], r[i + d], std::make_index_sequence<L>{});
  }
}

template <typename T, int L>
inline void transpose_square(typename LaneVec<T, L>::type* r) {
  static_assert(L == 8 || L == 16, "transpose_square is written for 8 or 16 lanes");
  if constexpr (L == 16) transpose_round<T, L, 8>(r);
  transpose_round<T, L, 4>(r);
  transpose_round<T, L, 2>(r);
  transpose_round<T, L, 1>(r);
}
#endif

// For a full tile (tr == L), the (L, L) squares of its first columns: square k0 is read from the L vectors at
// from(t, k0) and written, transposed, to the L vectors at to(t, k0). Returns the columns done.
template <typename T, int L, typename From, typename To>
inline int64_t copy_squares(int64_t tr, int64_t B, From&& from, To&& to) {
  int64_t k0 = 0;
#if defined(__GNUC__) || defined(__clang__)
  using V = typename LaneVec<T, L>::type;
  for (; tr == L && k0 + L <= B; k0 += L) {
    V r[L];
    for (int64_t t = 0; t < L; ++t) std::memcpy(&r[t], from(t, k0), sizeof(V));
    transpose_square<T, L>(r);
    for (int64_t t = 0; t < L; ++t) std::memcpy(to(t, k0), &r[t], sizeof(V));
  }
#endif
  return k0;
}

template <typename T, int L>
inline void tile_in(const T* const* rows, int64_t tr, int64_t B, T* tile) {
  int64_t k = copy_squares<T, L>(
      tr, B, [&](int64_t t, int64_t k0) { return rows[t] + k0; },
      [&](int64_t t, int64_t k0) { return tile + (k0 + t) * L; });
  for (; k < B; ++k) {
    for (int64_t t = 0; t < L; ++t) tile[k * L + t] = t < tr ? rows[t][k] : T(0);
  }
}

template <typename T, int L>
inline void tile_out(const T* tile, int64_t tr, int64_t B, T* const* rows) {
  int64_t k = copy_squares<T, L>(
      tr, B, [&](int64_t t, int64_t k0) { return tile + (k0 + t) * L; },
      [&](int64_t t, int64_t k0) { return rows[t] + k0; });
  for (; k < B; ++k) {
    for (int64_t t = 0; t < tr; ++t) rows[t][k] = tile[k * L + t];
  }
}

// Columns decided before their updates reach the rest of the block together (a rank-kChunk update reads and writes
// each weight once instead of kChunk times). float: 4 (8 accumulator halves + 8 broadcasts fit 16 SSE registers).
template <typename T>
constexpr int kChunk = sizeof(T) == 4 ? 4 : 2;

// Per-thread scratch of the tile sweep.
template <typename T>
struct TileScratch {
  std::vector<T> work, w0, pt, pv, nm_scores;
  std::vector<uint8_t> pruned;  // (B, L): 1 where the tile's weight is pruned
  TileScratch(int64_t B, int64_t m, bool chol, int64_t L)
      : work(static_cast<size_t>(B * L)),
        w0(chol ? static_cast<size_t>(B * L) : 0),
        pt(static_cast<size_t>(B * L)),
        pv(static_cast<size_t>(kChunk<T> * L)),
        nm_scores(static_cast<size_t>(m * L)),
        pruned(static_cast<size_t>(B * L)) {}
};

// Where the current weights of a block are read from, and the block of the in-block factor (U[blk, blk]).
template <typename T>
struct BlockView {
  int64_t i1 = 0, i2 = 0;
  const T* cur = nullptr;  // (rows, B) current weights at the start of the block, leading dimension ldc
  int64_t ldc = 0;
  const T* Ub = nullptr;  // (B, B) upper triangular, leading dimension ldub
  int64_t ldub = 0;
};

// N:M selection of one group for L rows at once (nm_prune_group per lane, without branches): `w` holds the
// group's m columns ((m, L)), `diag` the factor's diagonal entries of those columns with stride `dstride`.
// pruned[(c, t)] = 1 for the m - n lowest scores w²/d² of lane t, earlier column first among equal scores.
template <typename T, int L>
inline void nm_select_lanes(const T* w, const T* diag, int64_t dstride, int64_t n, int64_t m, uint8_t* pruned,
                            T* sc) {
  for (int64_t c = 0; c < m; ++c) {
    const T dc = diag[c * dstride];
    const T dd = dc * dc;
    for (int64_t t = 0; t < L; ++t) sc[c * L + t] = (w[c * L + t] * w[c * L + t]) / dd;
  }
  const int64_t drop = m - n;
  for (int64_t c = 0; c < m; ++c) {
    const T* si = sc + c * L;
    int32_t rank[L] = {};
    for (int64_t j = 0; j < c; ++j) {  // earlier columns rank below on ties
      const T* sj = sc + j * L;
      for (int64_t t = 0; t < L; ++t) rank[t] += sj[t] <= si[t];
    }
    for (int64_t j = c + 1; j < m; ++j) {
      const T* sj = sc + j * L;
      for (int64_t t = 0; t < L; ++t) rank[t] += sj[t] < si[t];
    }
    for (int64_t t = 0; t < L; ++t) pruned[c * L + t] = rank[t] < drop;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Steps 1 (N:M) and 2 of docs/algorithm.md ("The blocked sweep") for the rows [r0, r0 + tr) (tr <= L) of a
// block.
// thr: the block's unstructured selection (the tile computes its own mask from it; unused for N:M).
// PT (rows, ldpt) receives, in the tile's rows and the block's columns, what the lazy update needs: -err
// (kInverse) or W0 - q (kCholesky). The pruned weights go to W. Both are written row by row at the end: PT as it
// goes, a transposed column a whole row apart, would cost one page per column of the tile.
// Returns Σ err² over the tile.
// Columns are decided in chunks of `chunk`: inside a chunk one after the other (each one's update reaching the
// chunk's later columns first), then the chunk's updates reach the rest of the block together. Every weight gets
// its updates in column order, with the reference's roundings, so the result does not depend on the chunking.
// ---------------------------------------------------------------------------------------------------------------
template <typename T, Factor F, bool nm, bool quant, int L>
inline double sweep_tile(const SweepParams<T>& p, const BlockView<T>& v, int64_t r0, int64_t tr, const Threshold<T>& thr,
                         T* PT, int64_t ldpt, TileScratch<T>& s, int64_t chunk) {
  constexpr bool chol = F == Factor::kCholesky;
  constexpr int C = kChunk<T>;
  const int64_t i1 = v.i1, B = v.i2 - v.i1;
  T* work = s.work.data();
  T* w0 = s.w0.data();
  // transpose the tile in: L row streams read, contiguous writes; padding lanes are zero weights, which stay
  // zero and propagate nothing
  const T* crow[L];
  T* wrow[L];  // W still holds the original weights of this block; the pruned ones go there at the end
  for (int64_t t = 0; t < L; ++t) {
    crow[t] = t < tr ? v.cur + (r0 + t) * v.ldc : nullptr;
    wrow[t] = t < tr ? p.W + (r0 + t) * p.ldw + i1 : nullptr;
  }
  tile_in<T, L>(crow, tr, B, work);
  if (chol) tile_in<T, L>(wrow, tr, B, w0);
  if (!nm) threshold_lanes<T, L>(work, v.Ub, v.ldub, B, r0, thr, s.pruned.data());
  T* pv = s.pv.data();  // (chunk, L): -err of the chunk's columns
  const T maxq = static_cast<T>(p.maxq);
  T qs[L] = {}, qz[L] = {};  // quantization grid of the tile's rows for group qg
  int64_t qg = -1;
  double loss[L] = {};
  const T* urows[C];
  for (int64_t j0 = 0; j0 < B; j0 += chunk) {
    const int64_t cw = std::min(chunk, B - j0);
    for (int64_t c = 0; c < cw; ++c) {
      const int64_t j = j0 + c, col = i1 + j;
      const T* urow = v.Ub + j * v.ldub;  // row j of U[blk, blk]
      urows[c] = urow;
      const T d = urow[j];
      T* wj = work + j * L;
      if (nm && j % p.m == 0) {
        // score the group with the current (already updated) weights
        nm_select_lanes<T, L>(wj, urow + j, v.ldub + 1, p.n, p.m, s.pruned.data() + j * L, s.nm_scores.data());
      }
      if (quant && col / p.group_size != qg) {
        qg = col / p.group_size;
        for (int64_t t = 0; t < L; ++t) {
          const int64_t row = std::min(r0 + t, p.rows - 1);  // padding lanes: any finite grid (0 maps to 0)
          qs[t] = p.scale[row * p.ldq + qg];
          qz[t] = p.zero[row * p.ldq + qg];
        }
      }
      const uint8_t* pr = s.pruned.data() + j * L;
      const T* oj = w0 + j * L;
      T* pt = s.pt.data() + j * L;
      T* pc = pv + c * L;
      if (quant) {
        prune_lanes_scalar<T, chol, true, L>(wj, pr, d, oj, pc, pt, loss, qs, qz, maxq);
      } else {
        prune_lanes<T, chol, L>(wj, pr, d, oj, pc, pt, loss);
      }
      lane_update<T, 1, L>(work, &urows[c], pc, j + 1, j0 + cw);  // the chunk's later columns
    }
    if (cw == C) {
      lane_update<T, C, L>(work, urows, pv, j0 + cw, B);
    } else {
      for (int64_t c = 0; c < cw; ++c) lane_update<T, 1, L>(work, &urows[c], pv + c * L, j0 + cw, B);
    }
  }
  tile_out<T, L>(work, tr, B, wrow);
  for (int64_t t = 0; t < tr; ++t) wrow[t] = PT + (r0 + t) * ldpt;
  tile_out<T, L>(s.pt.data(), tr, B, wrow);
  double total = 0.0;
  for (int64_t t = 0; t < tr; ++t) total += loss[t];
  return total;
}

// The in-block steps compiled for AVX2 and AVX-512 as well, chosen at run time. The extension is built for the
// baseline of its target (SSE2 on x86-64), where the 8-lane LaneVec of floats is two 128-bit registers; the copies
// (sweep_tile inlined into a function built for the wider instruction set, `flatten`) hold 8 lanes in one 256-bit
// register (AVX2) or 16 in one 512-bit register (AVX-512). The build has -ffp-contract=off, so no copy fuses a
// multiply and an add: every operation is still rounded on its own, and all copies give the same bits.
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define SGK_HAVE_WIDE_TILES 1
template <typename T, Factor F, bool nm, bool quant>
__attribute__((target("avx2"), flatten)) double sweep_tile_avx2(const SweepParams<T>& p, const BlockView<T>& v,
                                                                int64_t r0, int64_t tr, const Threshold<T>& thr, T* PT,
                                                                int64_t ldpt, TileScratch<T>& s, int64_t chunk) {
  return sweep_tile<T, F, nm, quant, 8>(p, v, r0, tr, thr, PT, ldpt, s, chunk);
}

template <typename T, Factor F, bool nm, bool quant>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq"), flatten)) double sweep_tile_avx512(
    const SweepParams<T>& p, const BlockView<T>& v, int64_t r0, int64_t tr, const Threshold<T>& thr, T* PT, int64_t ldpt,
    TileScratch<T>& s, int64_t chunk) {
  return sweep_tile<T, F, nm, quant, 16>(p, v, r0, tr, thr, PT, ldpt, s, chunk);
}

inline Simd cpu_simd() {
  static const Simd best = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                                   __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")
                               ? Simd::kAvx512
                               : __builtin_cpu_supports("avx2") ? Simd::kAvx2 : Simd::kBaseline;
  return best;
}
#else
inline Simd cpu_simd() { return Simd::kBaseline; }
#endif

// The copy of the in-block steps sweep_tile_dispatch runs when `allowed` is the widest it may use.
inline Simd simd_used(Simd allowed) { return std::min(allowed, cpu_simd()); }

inline const char* simd_name(Simd s) {
  return s == Simd::kAvx512 ? "avx512" : s == Simd::kAvx2 ? "avx2" : "baseline";
}

template <typename T, Factor F, bool nm, bool quant>
inline double sweep_tile_dispatch(Simd simd, const SweepParams<T>& p, const BlockView<T>& v, int64_t r0, int64_t tr,
                                  const Threshold<T>& thr, T* PT, int64_t ldpt, TileScratch<T>& s, int64_t chunk) {
#ifdef SGK_HAVE_WIDE_TILES
  if (simd == Simd::kAvx512) return sweep_tile_avx512<T, F, nm, quant>(p, v, r0, tr, thr, PT, ldpt, s, chunk);
  if (simd == Simd::kAvx2) return sweep_tile_avx2<T, F, nm, quant>(p, v, r0, tr, thr, PT, ldpt, s, chunk);
#else
  (void)simd;
#endif
  return sweep_tile<T, F, nm, quant, 8>(p, v, r0, tr, thr, PT, ldpt, s, chunk);
}

// ---------------------------------------------------------------------------------------------------------------
// The whole blocked sweep (docs/algorithm.md, "The blocked sweep"), block by block, each block in four steps:
// start_block (its weights at the start and its block of the in-block factor), select_unstructured (step 1 for
// unstructured sparsity), sweep_tiles (step 1 for N:M, and step 2) and lazy_update (step 3). The object holds what
// the blocks share, allocated once by the constructor: inside the block loop only the tiles' scratch (one per range
// of tiles) and the selection's small lists are allocated.
// `parallel(ntasks, grain, fn)` runs fn(begin, end) over [0, ntasks), possibly on several threads, in
// non-overlapping ranges of at least `grain` tasks (fewer tasks than `grain`: one call, no threads).
// `gemm(m, n, k, a, lda, b, ldb, c, ldc, beta)`: C (m, n) = beta * C + A (m, k) @ B (k, n), all row-major; beta is 0
// (C is not read) or 1.
// run() returns the OBS loss Σ err² / 2.
// ---------------------------------------------------------------------------------------------------------------
template <typename T, Factor F, bool nm, bool quant>
class BlockedSweep {
 public:
  static constexpr bool kChol = F == Factor::kCholesky;

  explicit BlockedSweep(const SweepParams<T>& p)
      : p_(p),
        Bmax_(std::min(p.block_size, p.cols)),
        simd_(simd_used(p.simd)),
        L_(lanes_for(simd_)),
        ntiles_((p.rows + L_ - 1) / L_),
        group_cols_((kChol ? std::max<int64_t>(1, kLazyWidth / Bmax_) : 1) * Bmax_),
        ldpt_(std::min(group_cols_, p.cols)),
        chunk_(!nm || kChunk<T> % p.m == 0 || p.m % kChunk<T> == 0 ? kChunk<T> : 1),
        PT_(static_cast<size_t>(p.rows * ldpt_)),
        dd_(static_cast<size_t>(Bmax_)),
        S_(kChol ? static_cast<size_t>(p.rows * Bmax_) : 0),
        Ub_(kChol ? static_cast<size_t>(Bmax_ * Bmax_) : 0),
        partial_(static_cast<size_t>(ntiles_)) {}

  template <typename Parallel, typename Gemm>
  double run(Parallel&& parallel, Gemm&& gemm) {
    PhaseClock clock(p_.phase_seconds);
    for (int64_t i1 = 0; i1 < p_.cols; i1 += Bmax_) {
      const BlockView<T> v = start_block(i1, std::min(i1 + Bmax_, p_.cols), parallel, gemm);
      clock.lap(kBlockStart);
      if (!nm) {
        select_unstructured(v, parallel);
        clock.lap(kSelect);
      }
      sweep_tiles(v, parallel);
      clock.lap(kTiles);
      lazy_update(v, gemm);
      clock.lap(kLazy);
    }
    return loss_ / 2;
  }

 private:
  // The block [i1, i2): where its weights at the start are read from and its block of the in-block factor
  // (U[blk, blk]). kInverse: both are read in place, W's columns (the lazy updates of the earlier blocks have reached
  // them) and G's diagonal block. kCholesky: W still holds the original weights W0 there, so the start weights are
  // formed in S, W0_blk + A[:, blk] @ inv(R[blk, blk]) (see Factor; A is zero before the first block, so no GEMM
  // there), with inv(R[blk, blk]), which is U[blk, blk], computed into Ub by back substitution, columns in parallel.
  template <typename Parallel, typename Gemm>
  BlockView<T> start_block(int64_t i1, int64_t i2, Parallel&& parallel, Gemm&& gemm) {
    const SweepParams<T>& p = p_;
    const int64_t B = i2 - i1;
    BlockView<T> v;
    v.i1 = i1;
    v.i2 = i2;
    if constexpr (kChol) {
      T* const S = S_.data();
      T* const Ub = Ub_.data();
      const T* Rb = p.G + i1 * p.ldg + i1;
      parallel(B, 16, [&](int64_t b, int64_t e) { upper_inverse_columns(Rb, p.ldg, B, b, e, Ub); });
      parallel(p.rows, kScoreGrainRows, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) std::memcpy(S + r * B, p.W + r * p.ldw + i1, sizeof(T) * B);
      });
      if (i1 > 0) {
        gemm(p.rows, B, B, static_cast<const T*>(p.A + i1), p.lda, static_cast<const T*>(Ub), B, S, B, 1);
      }
      v.cur = S;
      v.ldc = B;
      v.Ub = Ub;
      v.ldub = B;
    } else {
      v.cur = p.W + i1;
      v.ldc = p.ldw;
      v.Ub = p.G + i1 * p.ldg + i1;
      v.ldub = p.ldg;
    }
    return v;
  }

  // Step 1 for unstructured sparsity: one Threshold over the whole (rows, B) block (select_threshold), from which
  // every tile computes its own mask. The scores w² / d² come from the block's start weights, d² rounded once per
  // column, exactly as threshold_lanes computes them in the tiles: both must rank the same values.
  template <typename Parallel>
  void select_unstructured(const BlockView<T>& v, Parallel&& parallel) {
    const int64_t B = v.i2 - v.i1;
    T* const dd = dd_.data();
    for (int64_t j = 0; j < B; ++j) {
      const T d = v.Ub[j * v.ldub + j];
      dd[j] = d * d;
    }
    auto row_scores = [&](int64_t r, T* sc) {
      const T* w = v.cur + r * v.ldc;
      for (int64_t j = 0; j < B; ++j) sc[j] = (w[j] * w[j]) / dd[j];
    };
    thr_ = select_threshold<T>(p_.rows, B, n_pruned(p_.sparsity, p_.rows * B), row_scores, select_scratch_, parallel);
  }

  // Step 2 (with step 1 for N:M): the block's rows in tiles of L, each tile through all B columns (sweep_tile), the
  // tiles in parallel with one TileScratch per range of tiles. A tile writes its pruned weights to W and what the
  // lazy update needs to the block's columns of PT. Its Σ err² goes to partial_[t]; the partial sums are added to
  // the total in tile order afterwards, so that the loss does not depend on the schedule.
  template <typename Parallel>
  void sweep_tiles(const BlockView<T>& v, Parallel&& parallel) {
    const SweepParams<T>& p = p_;
    const int64_t B = v.i2 - v.i1, L = L_, ldpt = ldpt_, chunk = chunk_;
    const Simd simd = simd_;
    const Threshold<T>& thr = thr_;
    T* const PTb = PT_.data() + (v.i1 - group_start(v.i1));  // this block's columns of PT
    double* const partial = partial_.data();
    const int64_t tile_grain = std::max<int64_t>(1, kSweepGrainElems / (L * B * B / 2 + 1));
    parallel(ntiles_, tile_grain, [&](int64_t b, int64_t e) {
      TileScratch<T> scratch(B, nm ? p.m : 0, kChol, L);
      for (int64_t t = b; t < e; ++t) {
        const int64_t r0 = t * L;
        partial[t] = sweep_tile_dispatch<T, F, nm, quant>(simd, p, v, r0, std::min(L, p.rows - r0), thr, PTb, ldpt,
                                                          scratch, chunk);
      }
    });
    for (double x : partial_) loss_ += x;
  }

  // Step 3: the lazy batch update of everything right of the block, one GEMM (none after the last block). kInverse:
  // W[:, i2:] += (-E) @ U[blk, i2:]. kCholesky: W keeps the original weights, and the updates go to A, with (W0 - Q)
  // and R: inside a group of blocks to the group's later columns only, at the group's end to everything right of the
  // group, for all of the group's blocks at once (one GEMM with K = the group's width, see group_cols_). beta is 0
  // where a column of A is written for the first time.
  template <typename Gemm>
  void lazy_update(const BlockView<T>& v, Gemm&& gemm) {
    const SweepParams<T>& p = p_;
    const int64_t i1 = v.i1, i2 = v.i2, B = i2 - i1;
    if (i2 >= p.cols) return;
    const int64_t ldpt = ldpt_;
    const T* Gr = p.G + i1 * p.ldg + i2;  // G[blk, i2:]
    if constexpr (kChol) {
      const int64_t s0 = group_start(i1), s1 = std::min(s0 + group_cols_, p.cols);
      const T* PTb = PT_.data() + (i1 - s0);  // this block's columns of PT
      // A[:, c] was written before iff an earlier group or an earlier block of this group updated it
      if (i2 < s1) {  // A[:, i2:s1] (+)= (W0 - Q)_blk @ R[blk, i2:s1]
        gemm(p.rows, s1 - i2, B, PTb, ldpt, Gr, p.ldg, p.A + i2, p.lda, s0 > 0 || i1 > s0 ? 1 : 0);
      } else {  // the group's end: A[:, s1:] (+)= (W0 - Q)_group @ R[group, s1:]
        gemm(p.rows, p.cols - s1, s1 - s0, static_cast<const T*>(PT_.data()), ldpt, p.G + s0 * p.ldg + s1, p.ldg,
             p.A + s1, p.lda, s0 > 0 ? 1 : 0);
      }
    } else {
      gemm(p.rows, p.cols - i2, B, static_cast<const T*>(PT_.data()), ldpt, Gr, p.ldg, p.W + i2, p.ldw,
           1);  // W[:, i2:] += (-E) @ U[blk, i2:]
    }
  }

  // The first column of the group of blocks that column i1 belongs to.
  int64_t group_start(int64_t i1) const { return i1 / group_cols_ * group_cols_; }

  const SweepParams<T>& p_;
  const int64_t Bmax_;  // columns per block (the last one may have fewer)
  const Simd simd_;     // the copy of the in-block steps that runs (sweep_tile_dispatch)
  const int64_t L_;     // rows per tile
  const int64_t ntiles_;
  // kCholesky defers the lazy update of the columns right of a group of blocks ("superblock", kLazyWidth columns) to
  // the group's end: one GEMM with K = kLazyWidth instead of kLazyWidth / B GEMMs with K = B (BLAS runs K = 512 at
  // about 1.3x the rate of K = 128 on 2 cores, K = 1024 a little faster still); inside the group each block still
  // updates the group's later columns. kInverse: one block per group.
  const int64_t group_cols_;
  const int64_t ldpt_;  // a group's columns, never more than W has
  // N:M groups must start at a chunk's first column or end inside the chunk (their columns are then up to date
  // when they are scored); otherwise one column at a time
  const int64_t chunk_;
  BigBuffer<T> PT_;  // (rows, ldpt): the group's W0 - Q (kCholesky) or -E
  SelectScratch<T> select_scratch_;
  Threshold<T> thr_;     // the current block's unstructured selection (unused for N:M)
  std::vector<T> dd_;    // the block's d_j²
  BigBuffer<T> S_;       // kCholesky: weights at the block start
  std::vector<T> Ub_;    // kCholesky: inv(R[blk, blk])
  std::vector<double> partial_;  // Σ err² per tile of the current block
  double loss_ = 0.0;
};

template <typename T, Factor F, bool nm, bool quant, typename Parallel, typename Gemm>
double sweep_impl(const SweepParams<T>& p, Parallel&& parallel, Gemm&& gemm) {
  return BlockedSweep<T, F, nm, quant>(p).run(parallel, gemm);
}

template <typename T, typename Parallel, typename Gemm>
double sweep(const SweepParams<T>& p, Parallel&& parallel, Gemm&& gemm) {
  check_params(p);
  if (p.rows == 0 || p.cols == 0) return 0.0;
  const bool nm = p.m != 0, quant = p.scale != nullptr;
#define SGK_SWEEP_CASE(F_, NM_, Q_) \
  if (p.factor == F_ && nm == NM_ && quant == Q_) return sweep_impl<T, F_, NM_, Q_>(p, parallel, gemm)
  SGK_SWEEP_CASE(Factor::kInverse, false, false);
  SGK_SWEEP_CASE(Factor::kInverse, false, true);
  SGK_SWEEP_CASE(Factor::kInverse, true, false);
  SGK_SWEEP_CASE(Factor::kInverse, true, true);
  SGK_SWEEP_CASE(Factor::kCholesky, false, false);
  SGK_SWEEP_CASE(Factor::kCholesky, false, true);
  SGK_SWEEP_CASE(Factor::kCholesky, true, false);
  SGK_SWEEP_CASE(Factor::kCholesky, true, true);
#undef SGK_SWEEP_CASE
  throw std::logic_error("unreachable");
}

}  // namespace sgk
