// Unit tests of the torch-free CPU core (csrc/core/sweep_core.h, csrc/core/sparse_linear.h) and of the shared rules
// (csrc/core/rules.h), run by ctest.
// The blocked sweep driven by U is checked bit for bit against a direct transcription of the reference algorithm
// (sparsegpt_kernels/reference.py) using the same arithmetic order; the sweep driven by the Cholesky factor is
// checked against the U-driven one with U = R^-1 computed in extended precision.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/sparse_codes.h"
#include "core/sparse_linear.h"
#include "core/sparse_panel.h"
#include "core/sweep_core.h"

namespace {

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond)                                                               \
  do {                                                                            \
    ++g_checks;                                                                   \
    if (!(cond)) {                                                                \
      ++g_failures;                                                               \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                             \
  } while (0)

// ---------------------------------------------------------------------------------------------------------------
void test_quantize() {
  // round half to even, clamp to [0, maxq], zero maps to exactly zero
  CHECK(sgk::quantize(0.0f, 0.1f, 7.0f, 15.0f) == 0.0f);
  CHECK(sgk::quantize(0.0, 0.3, 2.0, 3.0) == 0.0);
  CHECK(sgk::quantize(2.5f, 1.0f, 0.0f, 15.0f) == 2.0f);
  CHECK(sgk::quantize(3.5f, 1.0f, 0.0f, 15.0f) == 4.0f);
  CHECK(sgk::quantize(100.0f, 1.0f, 3.0f, 15.0f) == 12.0f);  // clamped to maxq - zero
  CHECK(sgk::quantize(-100.0f, 1.0f, 3.0f, 15.0f) == -3.0f);
}

void test_nm_group() {
  uint8_t pr[8];
  const float a[4] = {3, 1, 2, 0};
  sgk::nm_prune_group(a, 2, 4, pr);
  CHECK(pr[0] == 0 && pr[1] == 1 && pr[2] == 0 && pr[3] == 1);
  const float ties[4] = {1, 1, 1, 1};  // earlier columns pruned first
  sgk::nm_prune_group(ties, 2, 4, pr);
  CHECK(pr[0] == 1 && pr[1] == 1 && pr[2] == 0 && pr[3] == 0);
  sgk::nm_prune_group(ties, 1, 4, pr);  // 1 kept of 4: the last one stays
  CHECK(pr[0] == 1 && pr[1] == 1 && pr[2] == 1 && pr[3] == 0);
  const double b[8] = {5, 2, 2, 9, 0, 2, 7, 1};  // 2 kept of 8
  sgk::nm_prune_group(b, 2, 8, pr);
  int kept = 0;
  for (int i = 0; i < 8; ++i) kept += !pr[i];
  CHECK(kept == 2 && !pr[3] && !pr[6]);
  // keep-mask of a matrix: 1:2 on two rows
  const float s[8] = {1, 2, 2, 1, 0, 0, 3, 3};
  uint8_t keep[8];
  sgk::nm_keep_mask(s, 2, 4, 1, 2, keep);
  const uint8_t want[8] = {0, 1, 1, 0, 0, 1, 0, 1};
  for (int i = 0; i < 8; ++i) CHECK(keep[i] == want[i]);
  // the unrolled copies for M = 4 and 8 against the group rule, on scores with many ties, every N, two rows
  std::mt19937 gen(7);
  std::uniform_int_distribution<int> pick(0, 3);
  for (int m : {4, 8}) {
    for (int n = 1; n < m; ++n) {
      std::vector<float> sc(2 * 5 * m);
      for (float& v : sc) v = static_cast<float>(pick(gen));
      std::vector<uint8_t> got(sc.size()), group(static_cast<size_t>(m));
      sgk::nm_keep_mask(sc.data(), 2, 5 * m, n, m, got.data());
      for (size_t g = 0; g < sc.size(); g += m) {
        sgk::nm_prune_group(sc.data() + g, n, m, group.data());
        for (int i = 0; i < m; ++i) CHECK(got[g + i] == (group[i] ? 0 : 1));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Oracle of the unstructured selection (sgk::select_threshold): pruned[i] = 1 for exactly the k lowest of
// scores[0..count), ties in index order, by nth_element. `tmp` must hold `count` values.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
void select_k_lowest(const T* scores, int64_t count, int64_t k, uint8_t* pruned, T* tmp) {
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

void serial(int64_t ntasks, int64_t, const std::function<void(int64_t, int64_t)>& fn) { fn(0, ntasks); }

// The mask sgk::select_threshold decides for (rows, B) row-major scores: pruned[i] = thr.prunes(key of score i, i).
template <typename T, typename Parallel>
std::vector<uint8_t> select_mask(const T* scores, int64_t rows, int64_t B, int64_t k, Parallel&& parallel) {
  sgk::SelectScratch<T> scratch;
  auto row_scores = [&](int64_t r, T* out) { std::copy(scores + r * B, scores + (r + 1) * B, out); };
  const sgk::Threshold<T> thr = sgk::select_threshold<T>(rows, B, k, row_scores, scratch, parallel);
  std::vector<uint8_t> mask(static_cast<size_t>(rows * B));
  for (int64_t i = 0; i < rows * B; ++i) mask[i] = thr.prunes(sgk::score_key(scores[i]), i);
  return mask;
}

void test_select() {
  const float s[10] = {5, 1, 3, 3, 0, 3, 9, 3, 2, 8};
  uint8_t oracle[10];
  float tmp[10];
  auto m = select_mask(s, 1, 10, 4, serial);  // 0, 1, 2 and the first 3 (index 2)
  const uint8_t want[10] = {0, 1, 1, 0, 1, 0, 0, 0, 1, 0};
  for (int i = 0; i < 10; ++i) CHECK(m[i] == want[i]);
  m = select_mask(s, 1, 10, 6, serial);  // ... and the next two 3s (indices 3, 5)
  CHECK(m[2] && m[3] && m[5] && !m[7]);
  m = select_mask(s, 1, 10, 0, serial);
  for (int i = 0; i < 10; ++i) CHECK(m[i] == 0);
  m = select_mask(s, 1, 10, 10, serial);
  for (int i = 0; i < 10; ++i) CHECK(m[i] == 1);
  select_k_lowest(s, 10, 6, oracle, tmp);  // the oracle agrees on the hand-checked case
  m = select_mask(s, 1, 10, 6, serial);
  for (int i = 0; i < 10; ++i) CHECK(m[i] == oracle[i]);
  CHECK(sgk::n_pruned(0.5, 7) == 4 && sgk::n_pruned(0.5, 6) == 3 && sgk::n_pruned(0.0, 9) == 0);
  CHECK(sgk::n_pruned(1.0, 9) == 9);
}

// threshold_lanes (the mask a tile computes from its weights) against Threshold::prunes on the same scores, for tiles
// of L rows with ties at the threshold on both sides of last_tie.
template <typename T, int L>
void check_threshold_lanes(uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_int_distribution<int> lv(-3, 3);
  const int64_t B = 12, rows = 2 * L;
  std::vector<T> Ub(B * B, T(0)), W(rows * B);
  for (int64_t j = 0; j < B; ++j) Ub[j * B + j] = T(0.5) + T(j % 3);
  for (auto& x : W) x = static_cast<T>(lv(g)) * T(0.75);
  std::vector<T> sc(rows * B);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < B; ++j) {
      const T d = Ub[j * B + j];
      sc[r * B + j] = (W[r * B + j] * W[r * B + j]) / (d * d);
    }
  for (int64_t k : {int64_t{0}, int64_t{5}, rows * B / 2, rows * B / 2 + 1, rows * B}) {
    sgk::SelectScratch<T> scratch;
    auto row_scores = [&](int64_t r, T* out) { std::copy(sc.begin() + r * B, sc.begin() + (r + 1) * B, out); };
    const sgk::Threshold<T> thr = sgk::select_threshold<T>(rows, B, k, row_scores, scratch, serial);
    int64_t pruned = 0;
    bool same = true;
    for (int64_t r0 = 0; r0 < rows; r0 += L) {
      std::vector<T> work(B * L);
      for (int64_t j = 0; j < B; ++j)
        for (int64_t t = 0; t < L; ++t) work[j * L + t] = W[(r0 + t) * B + j];
      std::vector<uint8_t> flags(B * L);
      sgk::threshold_lanes<T, L>(work.data(), Ub.data(), B, B, r0, thr, flags.data());
      for (int64_t j = 0; j < B; ++j)
        for (int64_t t = 0; t < L; ++t) {
          const int64_t i = (r0 + t) * B + j;
          same = same && flags[j * L + t] == thr.prunes(sgk::score_key(sc[i]), i);
          pruned += flags[j * L + t];
        }
    }
    CHECK(same);
    CHECK(pruned == k);  // exactly k, ties included
  }
}

void test_threshold_lanes() {
  check_threshold_lanes<float, 8>(1);
  check_threshold_lanes<float, 16>(2);
  check_threshold_lanes<double, 8>(3);
}

// ---------------------------------------------------------------------------------------------------------------
// Direct transcription of reference.sweep (per-column loop over whole rows, lazy GEMM in the same order).
template <typename T>
void naive_gemm_update(std::vector<T>& W, int64_t cols, const std::vector<T>& U, int64_t rows, int64_t i1,
                         int64_t i2, const T* E) {
  const int64_t B = i2 - i1;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = i2; c < cols; ++c) {
      T acc = 0;
      for (int64_t k = 0; k < B; ++k) acc += E[r * B + k] * U[(i1 + k) * cols + c];
      W[r * cols + c] -= acc;
    }
  }
}

template <typename T>
double reference_sweep(std::vector<T>& W, const std::vector<T>& U, int64_t rows, int64_t cols,
                       const sgk::SweepParams<T>& p) {
  const int64_t Bmax = std::min(p.block_size, cols);
  double loss = 0;
  for (int64_t i1 = 0; i1 < cols; i1 += Bmax) {
    const int64_t i2 = std::min(i1 + Bmax, cols), B = i2 - i1;
    std::vector<uint8_t> pruned(rows * B, 0);
    std::vector<T> E(rows * B);
    if (p.m == 0) {
      std::vector<T> s(rows * B), tmp(rows * B);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < B; ++j) {
          const T d = U[(i1 + j) * cols + i1 + j], w = W[r * cols + i1 + j];
          s[r * B + j] = (w * w) / (d * d);
        }
      select_k_lowest(s.data(), rows * B, sgk::n_pruned(p.sparsity, rows * B), pruned.data(), tmp.data());
    }
    for (int64_t j = 0; j < B; ++j) {
      const int64_t col = i1 + j;
      const T d = U[col * cols + col];
      for (int64_t r = 0; r < rows; ++r) {
        if (p.m != 0 && j % p.m == 0) {
          std::vector<T> s(p.m);
          for (int64_t c = 0; c < p.m; ++c) {
            const T dc = U[(col + c) * cols + col + c], w = W[r * cols + col + c];
            s[c] = (w * w) / (dc * dc);
          }
          sgk::nm_prune_group(s.data(), p.n, p.m, pruned.data() + r * B + j);
        }
        const T w = W[r * cols + col];
        T q = pruned[r * B + j] ? T(0) : w;
        if (p.scale) {
          const int64_t g = col / p.group_size;
          q = sgk::quantize(q, p.scale[r * p.ldq + g], p.zero[r * p.ldq + g], static_cast<T>(p.maxq));
        }
        const T err = (w - q) / d;
        loss += static_cast<double>(err) * err;
        W[r * cols + col] = q;
        for (int64_t k = col + 1; k < i2; ++k) W[r * cols + k] -= err * U[col * cols + k];
        E[r * B + j] = err;
      }
    }
    if (i2 < cols) naive_gemm_update(W, cols, U, rows, i1, i2, E.data());
  }
  return loss / 2;
}

// The core's GEMM: C (m, n) = beta * C + A @ B, each element accumulated in k order.
template <typename T>
void naive_gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc,
                int beta) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      T acc = 0;
      for (int64_t l = 0; l < k; ++l) acc += a[i * lda + l] * b[l * ldb + j];
      c[i * ldc + j] = beta ? c[i * ldc + j] + acc : acc;
    }
  }
}

template <typename T>
void random_problem(int64_t rows, int64_t cols, uint32_t seed, std::vector<T>& W, std::vector<T>& U) {
  std::mt19937 g(seed);
  std::normal_distribution<double> nd;
  W.assign(rows * cols, T(0));
  U.assign(cols * cols, T(0));
  for (auto& x : W) x = static_cast<T>(nd(g));
  for (int64_t i = 0; i < cols; ++i) {
    U[i * cols + i] = static_cast<T>(0.5 + std::abs(nd(g)));
    for (int64_t j = i + 1; j < cols; ++j) U[i * cols + j] = static_cast<T>(0.1 * nd(g));
  }
}

// Parameters of a dense (rows, cols) problem on the factor G (row-major, leading dimensions = cols).
template <typename T>
sgk::SweepParams<T> make_params(int64_t rows, int64_t cols, T* W, const T* G, int64_t block, double sparsity,
                                int64_t n, int64_t m) {
  sgk::SweepParams<T> p;
  p.rows = rows;
  p.cols = cols;
  p.W = W;
  p.ldw = cols;
  p.G = G;
  p.ldg = cols;
  p.sparsity = sparsity;
  p.n = n;
  p.m = m;
  p.block_size = block;
  return p;
}

template <typename T>
void check_sweep(const char* name, int64_t rows, int64_t cols, int64_t block, double sparsity, int64_t n,
                 int64_t m, int64_t bits, int64_t group) {
  std::vector<T> W, U;
  random_problem<T>(rows, cols, static_cast<uint32_t>(rows * 131 + cols), W, U);
  std::vector<T> Wref = W;
  std::vector<T> scale, zero;
  sgk::SweepParams<T> p = make_params(rows, cols, W.data(), U.data(), block, sparsity, n, m);
  if (bits) {
    const int64_t ng = cols / group;
    scale.assign(rows * ng, T(0));
    zero.assign(rows * ng, T(0));
    const T maxq = static_cast<T>((1 << bits) - 1);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < ng; ++g) {
        T lo = 0, hi = 0;
        for (int64_t c = g * group; c < (g + 1) * group; ++c) {
          lo = std::min(lo, W[r * cols + c]);
          hi = std::max(hi, W[r * cols + c]);
        }
        scale[r * ng + g] = (hi - lo) / maxq;
        zero[r * ng + g] = std::nearbyint(-lo / scale[r * ng + g]);
      }
    p.scale = scale.data();
    p.zero = zero.data();
    p.ldq = ng;
    p.group_size = group;
    p.maxq = (1 << bits) - 1;
  }
  // tiles handed out in reverse order, in chunks of 3: the result must not depend on the schedule
  auto parallel = [](int64_t ntasks, int64_t /*grain*/, const std::function<void(int64_t, int64_t)>& fn) {
    for (int64_t e = ntasks; e > 0; e -= 3) fn(std::max<int64_t>(0, e - 3), e);
  };
  const double loss = sgk::sweep(p, parallel, naive_gemm<T>);
  sgk::SweepParams<T> pr = p;
  pr.W = Wref.data();
  const double loss_ref = reference_sweep(Wref, U, rows, cols, pr);
  bool same = true;
  int64_t zeros = 0;
  for (int64_t i = 0; i < rows * cols; ++i) {
    same = same && (W[i] == Wref[i]);
    zeros += W[i] == 0;
  }
  ++g_checks;
  if (!same || std::abs(loss - loss_ref) > 1e-9 * std::max(1.0, std::abs(loss_ref))) {
    ++g_failures;
    std::fprintf(stderr, "sweep %s (%lld x %lld, B=%lld): differs from the reference (loss %.17g vs %.17g)\n", name,
                 static_cast<long long>(rows), static_cast<long long>(cols), static_cast<long long>(block), loss,
                 loss_ref);
  }
  if (m != 0 && bits == 0) CHECK(zeros == rows * cols / m * (m - n));
}

void test_sweep() {
  for (int64_t rows : {1, 7, 13, 33}) {
    check_sweep<float>("50%", rows, 40, 16, 0.5, 0, 0, 0, 0);
    check_sweep<double>("50%", rows, 40, 16, 0.5, 0, 0, 0, 0);
    check_sweep<float>("30%", rows, 37, 8, 0.3, 0, 0, 0, 0);
    check_sweep<float>("2:4", rows, 40, 16, 0.5, 2, 4, 0, 0);
    check_sweep<double>("4:8", rows, 48, 16, 0.5, 4, 8, 0, 0);
    check_sweep<float>("1:4", rows, 24, 24, 0.75, 1, 4, 0, 0);
    check_sweep<float>("50%-q4", rows, 40, 16, 0.5, 0, 0, 4, 40);
    check_sweep<float>("2:4-q3g8", rows, 40, 16, 0.5, 2, 4, 3, 8);
    check_sweep<double>("2:8-q8g20", rows, 40, 16, 0.75, 2, 8, 8, 20);
  }
  check_sweep<float>("B=1", 5, 9, 1, 0.5, 0, 0, 0, 0);
  check_sweep<float>("B>cols", 5, 9, 64, 0.5, 0, 0, 0, 0);
}

// The Cholesky-driven sweep against the U-driven one: R upper with a dominant diagonal, U = R^-1 by back substitution
// in long double. Same masks, weights and loss to rounding.
void check_cholesky(const char* name, int64_t rows, int64_t cols, int64_t block, double sparsity, int64_t n,
                    int64_t m) {
  std::mt19937 g(static_cast<uint32_t>(rows * 977 + cols * 13 + block));
  std::normal_distribution<double> nd;
  std::vector<long double> R(cols * cols, 0.0L);
  for (int64_t i = 0; i < cols; ++i) {
    R[i * cols + i] = 1.0L + std::abs(nd(g));
    for (int64_t j = i + 1; j < cols; ++j) R[i * cols + j] = 0.3L * nd(g) / std::sqrt(static_cast<double>(cols));
  }
  std::vector<double> F(cols * cols, 0.0), U(cols * cols, 0.0);
  for (int64_t i = 0; i < cols * cols; ++i) F[i] = static_cast<double>(R[i]);
  // U = R^-1, column by column (upper triangular)
  for (int64_t j = 0; j < cols; ++j) {
    for (int64_t i = j; i >= 0; --i) {
      long double acc = i == j ? 1.0L : 0.0L;
      for (int64_t k = i + 1; k <= j; ++k) acc -= R[i * cols + k] * static_cast<long double>(U[k * cols + j]);
      U[i * cols + j] = static_cast<double>(acc / R[i * cols + i]);
    }
  }
  std::vector<double> W(rows * cols);
  for (auto& x : W) x = nd(g);
  std::vector<double> Wu = W, A(rows * cols, std::nan(""));
  auto serial = [](int64_t ntasks, int64_t, const std::function<void(int64_t, int64_t)>& fn) {
    for (int64_t e = ntasks; e > 0; e -= 2) fn(std::max<int64_t>(0, e - 2), e);
  };
  sgk::SweepParams<double> p = make_params(rows, cols, W.data(), F.data(), block, sparsity, n, m);
  p.factor = sgk::Factor::kCholesky;
  p.A = A.data();
  p.lda = cols;
  const double loss = sgk::sweep(p, serial, naive_gemm<double>);
  sgk::SweepParams<double> pu = p;
  pu.W = Wu.data();
  pu.G = U.data();
  pu.factor = sgk::Factor::kInverse;
  pu.A = nullptr;
  const double loss_u = sgk::sweep(pu, serial, naive_gemm<double>);
  double maxdiff = 0.0;
  bool same_mask = true;
  for (int64_t i = 0; i < rows * cols; ++i) {
    maxdiff = std::max(maxdiff, std::abs(W[i] - Wu[i]));
    same_mask = same_mask && ((W[i] == 0) == (Wu[i] == 0));
  }
  ++g_checks;
  if (!same_mask || maxdiff > 1e-9 || std::abs(loss - loss_u) > 1e-9 * std::max(1.0, loss_u)) {
    ++g_failures;
    std::fprintf(stderr, "cholesky sweep %s (%lld x %lld, B=%lld): mask %s, max |dW| %.3g, loss %.17g vs %.17g\n",
                 name, static_cast<long long>(rows), static_cast<long long>(cols), static_cast<long long>(block),
                 same_mask ? "same" : "differs", maxdiff, loss, loss_u);
  }
}

void test_cholesky() {
  for (int64_t rows : {1, 7, 9, 17}) {
    check_cholesky("50%", rows, 40, 16, 0.5, 0, 0);
    check_cholesky("30% odd", rows, 37, 8, 0.3, 0, 0);
    check_cholesky("2:4", rows, 40, 16, 0.5, 2, 4);
    check_cholesky("4:8 one block", rows, 48, 48, 0.5, 4, 8);
    check_cholesky("1:3 (column by column)", rows, 48, 24, 2.0 / 3, 1, 3);
    check_cholesky("2:6 (column by column)", rows, 48, 24, 2.0 / 3, 2, 6);
  }
  check_cholesky("B=1", 5, 9, 1, 0.5, 0, 0);
}

// The parallel radix select against select_k_lowest (nth_element): same mask for every k, with and without ties,
// in float and double, whatever the order the chunks run in.
template <typename T>
void check_select_block(int64_t rows, int64_t B, int levels, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_int_distribution<int> lv(0, levels - 1);
  std::uniform_real_distribution<double> ud(0.0, 4.0);
  std::vector<T> s(rows * B), tmp(rows * B);
  for (auto& x : s) x = levels > 0 ? static_cast<T>(lv(g)) : static_cast<T>(ud(g));
  auto reversed = [](int64_t ntasks, int64_t, const std::function<void(int64_t, int64_t)>& fn) {
    for (int64_t e = ntasks; e > 0; e -= 3) fn(std::max<int64_t>(0, e - 3), e);
  };
  for (int64_t k : {int64_t{0}, int64_t{1}, rows * B / 3, rows * B / 2, rows * B - 1, rows * B}) {
    std::vector<uint8_t> want(rows * B);
    select_k_lowest(s.data(), rows * B, k, want.data(), tmp.data());
    const bool same = select_mask(s.data(), rows, B, k, reversed) == want;
    ++g_checks;
    if (!same) {
      ++g_failures;
      std::fprintf(stderr, "select_threshold (%lld x %lld, levels %d, k %lld) differs from select_k_lowest\n",
                   static_cast<long long>(rows), static_cast<long long>(B), levels, static_cast<long long>(k));
    }
  }
}

void test_select_block() {
  for (int levels : {0, 1, 3, 1000}) {
    check_select_block<float>(1, 7, levels, 1);
    check_select_block<float>(300, 16, levels, 2);
    check_select_block<double>(129, 8, levels, 3);
    check_select_block<float>(2049, 5, levels, 4);
    check_select_block<float>(4100, 3, levels, 5);  // several chunks of rows
    check_select_block<double>(3000, 4, levels, 6);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The shared rules (csrc/core/rules.h) on their edges; tests/test_rules.py compares the same values with Python's.
// ---------------------------------------------------------------------------------------------------------------
static_assert(sgk::valid_damp(0.01) && !sgk::valid_damp(0.0), "the rules are usable at compile time");
static_assert(sgk::valid_maxq(15) && !sgk::valid_maxq(16), "the rules are usable at compile time");

void test_rules() {
  constexpr double inf = std::numeric_limits<double>::infinity();
  constexpr double tiny = std::numeric_limits<double>::denorm_min();
  const double nan = std::nan("");
  CHECK(sgk::kMinQuantBits == 2 && sgk::kMaxQuantBits == 8);
  CHECK(sgk::kCudaMaxBlock == 1024);
  // damping: finite and > 0
  CHECK(sgk::valid_damp(0.01) && sgk::valid_damp(tiny) && sgk::valid_damp(1e6));
  CHECK(sgk::valid_damp(std::numeric_limits<double>::max()));
  CHECK(!sgk::valid_damp(0.0) && !sgk::valid_damp(-0.0) && !sgk::valid_damp(-tiny) && !sgk::valid_damp(-1.0));
  CHECK(!sgk::valid_damp(inf) && !sgk::valid_damp(-inf) && !sgk::valid_damp(nan));
  // sparsity: [0, 1)
  CHECK(sgk::valid_sparsity(0.0) && sgk::valid_sparsity(-0.0) && sgk::valid_sparsity(tiny));
  CHECK(sgk::valid_sparsity(0.5) && sgk::valid_sparsity(std::nextafter(1.0, 0.0)));
  CHECK(!sgk::valid_sparsity(1.0) && !sgk::valid_sparsity(std::nextafter(1.0, 2.0)) && !sgk::valid_sparsity(1.5));
  CHECK(!sgk::valid_sparsity(-tiny) && !sgk::valid_sparsity(-0.5));
  CHECK(!sgk::valid_sparsity(nan) && !sgk::valid_sparsity(inf) && !sgk::valid_sparsity(-inf));
  // N:M: 0 < N < M
  CHECK(sgk::valid_nm(1, 2) && sgk::valid_nm(1, 4) && sgk::valid_nm(2, 4) && sgk::valid_nm(3, 4));
  CHECK(sgk::valid_nm(4, 8) && sgk::valid_nm(2, 1000));
  CHECK(!sgk::valid_nm(0, 4) && !sgk::valid_nm(4, 4) && !sgk::valid_nm(5, 4) && !sgk::valid_nm(-1, 4));
  CHECK(!sgk::valid_nm(0, 0) && !sgk::valid_nm(1, 1) && !sgk::valid_nm(1, 0) && !sgk::valid_nm(-2, -1));
  // maxq: 2^bits - 1 for bits in 2..8, nothing else (all of -2..300, and around 2^9 - 1)
  const std::vector<int64_t> levels = {3, 7, 15, 31, 63, 127, 255};
  bool same = true;
  for (int64_t q = -2; q <= 300; ++q) {
    const bool want = std::find(levels.begin(), levels.end(), q) != levels.end();
    same = same && sgk::valid_maxq(q) == want;
  }
  CHECK(same);
  CHECK(!sgk::valid_maxq(1) && !sgk::valid_maxq(511) && !sgk::valid_maxq(int64_t{1} << 40));
}

void test_params_rejected() {
  std::vector<float> W(4 * 8), U(8 * 8);
  auto base = [&] {
    sgk::SweepParams<float> p;
    p.rows = 4;
    p.cols = 8;
    p.W = W.data();
    p.ldw = 8;
    p.G = U.data();
    p.ldg = 8;
    p.sparsity = 0.5;
    p.block_size = 4;
    return p;
  };
  auto rejects = [&](sgk::SweepParams<float> p) {
    try {
      sgk::check_params(p);
    } catch (const std::invalid_argument&) {
      return true;
    }
    return false;
  };
  CHECK(!rejects(base()));
  auto p = base();
  p.n = 2;
  p.m = 3;  // 8 % 3
  CHECK(rejects(p));
  p = base();
  p.n = 4;
  p.m = 4;
  CHECK(rejects(p));
  p = base();
  p.n = 1;
  p.m = 8;  // block 4 % 8
  CHECK(rejects(p));
  p = base();
  p.block_size = 0;
  CHECK(rejects(p));
  p = base();
  p.sparsity = 1.5;
  CHECK(rejects(p));
  p.sparsity = 1.0;  // the rule is [0, 1)
  CHECK(rejects(p));
  p.sparsity = std::nan("");
  CHECK(rejects(p));
  p.sparsity = 0.0;
  CHECK(!rejects(p));
  p = base();
  p.scale = U.data();  // no zero
  CHECK(rejects(p));
  std::vector<float> grid(4 * 2, 1.0f);  // scale/zero of (4, 8 / 4)
  p = base();
  p.scale = grid.data();
  p.zero = grid.data();
  p.ldq = 2;
  p.group_size = 4;
  p.maxq = 15;
  CHECK(!rejects(p));
  for (int64_t maxq : {int64_t{0}, int64_t{1}, int64_t{14}, int64_t{16}, int64_t{511}}) {  // not 2^bits - 1, bits 2..8
    p.maxq = maxq;
    CHECK(rejects(p));
  }
  p = base();
  p.factor = sgk::Factor::kCholesky;  // two blocks, no accumulator
  CHECK(rejects(p));
  p.A = W.data();
  p.lda = 8;
  CHECK(!rejects(p));
  p = base();
  p.G = nullptr;
  CHECK(rejects(p));
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// The sparse linear kernel: every SIMD copy against the one-weight-at-a-time loop, on masks with empty and full rows,
// widths that are not multiples of 8 or 16, 1..6 tokens, float32 and bfloat16 values.
template <typename V>
void check_sparse_rows(int64_t rows, int64_t cols, double keep, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::bernoulli_distribution kept(keep);
  const int64_t ldm = (cols + 7) / 8;
  std::vector<uint8_t> mask(static_cast<size_t>(rows * ldm), 0);
  std::vector<V> values;
  std::vector<int64_t> offsets(static_cast<size_t>(rows + 1), 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      const bool k = r == 0 ? false : r == 1 ? true : kept(gen);  // row 0 empty, row 1 full
      if (!k) continue;
      mask[static_cast<size_t>(r * ldm + j / 8)] |= static_cast<uint8_t>(1u << (j % 8));
      const float f = uni(gen);
      if constexpr (sizeof(V) == 4) {
        values.push_back(f);
      } else {
        uint32_t u;
        std::memcpy(&u, &f, sizeof u);
        values.push_back(static_cast<uint16_t>(u >> 16));
      }
    }
    offsets[static_cast<size_t>(r + 1)] = static_cast<int64_t>(values.size());
  }
  values.resize(values.size() + sgk::kPadValues, V(0));
  sgk::SparseRows<V> w;
  w.rows = rows;
  w.cols = cols;
  w.mask = mask.data();
  w.ldm = ldm;
  w.values = values.data();
  w.offsets = offsets.data();
  // the dense weight: every SIMD copy gives the loop's bits (the last rows' loads masked at the values' end)
  std::vector<V> dense(static_cast<size_t>(rows * cols)), wide(dense.size());
  sgk::sparse_rows_to_dense(w, dense.data(), 0, rows);
  for (sgk::Simd simd : {sgk::Simd::kBaseline, sgk::Simd::kAvx2, sgk::Simd::kAvx512}) {
    std::fill(wide.begin(), wide.end(), V(1));
    sgk::sparse_rows_to_dense(sgk::simd_used(simd), w, wide.data(), 0, rows);
    CHECK(std::memcmp(wide.data(), dense.data(), sizeof(V) * dense.size()) == 0);
  }
  for (int64_t T = 1; T <= 6; ++T) {
    std::vector<float> x(static_cast<size_t>(T * cols)), bias(static_cast<size_t>(rows));
    for (auto& v : x) v = uni(gen);
    for (auto& v : bias) v = uni(gen);
    std::vector<float> ref(static_cast<size_t>(T * rows)), got(ref.size());
    sgk::sparse_rows_scalar(w, x.data(), T, cols, bias.data(), ref.data(), rows, 0, rows);
    for (sgk::Simd simd : {sgk::Simd::kBaseline, sgk::Simd::kAvx2, sgk::Simd::kAvx512}) {
      sgk::sparse_rows(sgk::simd_used(simd), w, x.data(), T, cols, bias.data(), got.data(), rows, 0, rows);
      bool close = true;
      for (size_t i = 0; i < ref.size(); ++i) {
        close = close && std::fabs(got[i] - ref[i]) <= 1e-5f * static_cast<float>(cols) + 1e-6f;
      }
      CHECK(close);
      if (simd == sgk::Simd::kBaseline) CHECK(got == ref);  // the same order of sums: the same bits
      CHECK(got[0] == bias[0]);                             // the empty row is its bias
    }
    if constexpr (sizeof(V) == 2) {
      // the bfloat16 dot products (where the CPU has them): x rounded to bfloat16, against the loop on the same x
      if (!sgk::cpu_has_bf16_dot()) continue;
      std::vector<uint16_t> xb(x.size());
      for (size_t i = 0; i < x.size(); ++i) {
        uint32_t u;
        std::memcpy(&u, &x[i], sizeof u);
        xb[i] = static_cast<uint16_t>(u >> 16);
        x[i] = sgk::bf16_to_float(xb[i]);
      }
      sgk::sparse_rows_scalar(w, x.data(), T, cols, bias.data(), ref.data(), rows, 0, rows);
      sgk::sparse_rows_bf16(w, xb.data(), T, cols, bias.data(), got.data(), rows, 0, rows);
      bool close = true;
      for (size_t i = 0; i < ref.size(); ++i) {
        close = close && std::fabs(got[i] - ref[i]) <= 1e-5f * static_cast<float>(cols) + 1e-6f;
      }
      CHECK(close);
      CHECK(got[0] == bias[0]);
      // the byte-shuffle copy (CPUs without VBMI2) gives the VBMI2 copy's bits
      std::vector<float> shuffled(ref.size());
      sgk::sparse_rows_bf16(w, xb.data(), T, cols, bias.data(), shuffled.data(), rows, 0, rows, false);
      CHECK(shuffled == got);
    }
  }
}

void test_sparse_linear() {
  for (int64_t cols : {1, 7, 8, 9, 16, 17, 31, 32, 33, 64, 65, 96, 130}) {
    check_sparse_rows<float>(5, cols, 0.5, static_cast<unsigned>(cols));
    check_sparse_rows<uint16_t>(5, cols, 0.3, static_cast<unsigned>(cols + 100));
  }
  check_sparse_rows<float>(3, 40, 0.0, 7);  // every row but the full one empty
  uint8_t bytes[3] = {0xFF, 0x01, 0x80};
  CHECK(sgk::count_bits(sgk::Simd::kBaseline, bytes, 3) == 10);
  CHECK(sgk::count_bits(sgk::simd_used(sgk::Simd::kAvx512), bytes, 3) == 10);
}

// Codes of 4 bits or less against bfloat16 x on the bfloat16 dot products: the 64-column steps give the 32-column
// steps' bits, both within the float32 bound of the loop on the dequantized weights (the format's definition), for
// empty, full and random rows, groups of 32 to 256 columns, token counts 1..9 (the chains of 1 token and the groups
// of 8), codes of 2, 3 and 4 bits.
void check_code_rows_bf16(int64_t rows, int64_t cols, int64_t group, int bits, double keep, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::bernoulli_distribution kept(keep);
  const int64_t ldm = cols / 8, groups = cols / group;
  std::vector<uint8_t> mask(static_cast<size_t>(rows * ldm), 0), codes, zero(static_cast<size_t>(rows * groups));
  std::vector<float> scale(zero.size());
  std::vector<int64_t> offsets(static_cast<size_t>(rows + 1), 0);
  for (size_t i = 0; i < zero.size(); ++i) {
    scale[i] = 0.01f + 0.1f * std::fabs(uni(gen));
    zero[i] = static_cast<uint8_t>(gen() % (1u << bits));
  }
  for (int64_t r = 0; r < rows; ++r) {
    int64_t n = 0;
    for (int64_t j = 0; j < cols; ++j) {
      const bool k = r == 0 ? false : r == 1 ? true : kept(gen);  // row 0 empty, row 1 full
      if (!k) continue;
      mask[static_cast<size_t>(r * ldm + j / 8)] |= static_cast<uint8_t>(1u << (j % 8));
      const auto c = static_cast<uint8_t>(gen() % (1u << bits));
      if (n++ % 2 == 0) {
        codes.push_back(c);
      } else {
        codes.back() = static_cast<uint8_t>(codes.back() | (c << 4));
      }
    }
    offsets[static_cast<size_t>(r + 1)] = static_cast<int64_t>(codes.size());
  }
  codes.resize(codes.size() + sgk::kPadCodeBytes, 0);
  sgk::SparseCodes w;
  w.rows = rows;
  w.cols = cols;
  w.mask = mask.data();
  w.ldm = ldm;
  w.codes = codes.data();
  w.offsets = offsets.data();
  w.scale = scale.data();
  w.zero = zero.data();
  w.group = group;
  w.bits = bits;
  w.rounding = sgk::Rounding::kBFloat16;
  CHECK(sgk::code_bf16_dot_takes(sgk::Simd::kAvx512, w));
  // the dense bfloat16 weight: the 64-column steps (groups of a multiple of 64) give the loop's bits
  std::vector<uint16_t> dense(static_cast<size_t>(rows * cols)), fast(dense.size(), 1);
  sgk::sparse_code_rows_to_dense(w, dense.data(), 0, rows);
  sgk::sparse_code_rows_to_dense(sgk::Simd::kAvx512, w, fast.data(), 0, rows);
  CHECK(fast == dense);
  for (int64_t T = 1; T <= 9; ++T) {
    std::vector<uint16_t> xb(static_cast<size_t>(T * cols));
    std::vector<float> x(xb.size()), bias(static_cast<size_t>(rows));
    for (size_t i = 0; i < xb.size(); ++i) {
      const float f = uni(gen);
      uint32_t u;
      std::memcpy(&u, &f, sizeof u);
      xb[i] = static_cast<uint16_t>(u >> 16);
      x[i] = sgk::bf16_to_float(xb[i]);
    }
    for (auto& v : bias) v = uni(gen);
    std::vector<float> ref(static_cast<size_t>(T * rows)), wide(ref.size()), narrow(ref.size());
    sgk::sparse_code_rows_scalar(w, x.data(), T, cols, bias.data(), ref.data(), rows, 0, rows);
    sgk::sparse_code_rows_bf16(w, xb.data(), T, cols, bias.data(), wide.data(), rows, 0, rows);
    sgk::sparse_code_rows_bf16(w, xb.data(), T, cols, bias.data(), narrow.data(), rows, 0, rows, false);
    CHECK(wide == narrow);
    bool close = true;
    for (size_t i = 0; i < ref.size(); ++i) {
      close = close && std::fabs(wide[i] - ref[i]) <= 1e-5f * static_cast<float>(cols) + 1e-6f;
    }
    CHECK(close);
    CHECK(wide[0] == bias[0]);  // the empty row is its bias
  }
}

void test_sparse_codes_bf16() {
  if (!sgk::cpu_has_codes_bf16_dot()) {
    std::printf("test_sparse_codes_bf16: this CPU has no bfloat16 dot products with VBMI2; not run\n");
    return;
  }
  const int64_t shapes[][2] = {{32, 32}, {64, 64}, {128, 64}, {192, 64}, {256, 128}, {256, 256}, {96, 32}};
  for (const auto& s : shapes) {
    for (int bits : {2, 3, 4}) {
      for (double keep : {0.03, 0.5, 0.97}) {
        check_code_rows_bf16(7, s[0], s[1], bits, keep, static_cast<unsigned>(s[0] + s[1] + bits));
      }
    }
  }
}

// The panel kernel's AVX-512 and AVX2 copies against its specification, bit for bit: random masks with an empty, a
// full and a one-value row, column counts across the blocks and not a multiple of 8 or 16, every panel width
// 16..128; and the panel against a float64 product. Then the AVX-512 and AVX2 decoders of 2-, 4- and 8-bit codes
// against the scalar one.
void test_sparse_panel() {
  std::vector<sgk::Simd> simds;
  if (sgk::cpu_has_panel()) simds.push_back(sgk::Simd::kAvx512);
  if (sgk::cpu_has_panel_avx2()) simds.push_back(sgk::Simd::kAvx2);
  if (simds.empty()) {
    std::printf("test_sparse_panel: this CPU has neither AVX-512 nor AVX2 for the panel kernel; not run\n");
    return;
  }
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int64_t cols : {5, 16, 33, 130, 700, 1100}) {
    const int64_t rows = 9, ldm = (cols + 7) / 8;
    std::vector<uint8_t> mask(static_cast<size_t>(rows * ldm), 0);
    std::vector<int64_t> kept(rows + 1, 0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) {
        const bool on = r == 0 ? false : r == 1 ? true : r == 2 ? j == cols / 2 : u(rng) > 0.0f;
        if (on) mask[static_cast<size_t>(r * ldm + j / 8)] |= static_cast<uint8_t>(1u << (j % 8));
      }
      kept[r + 1] = kept[r] + sgk::count_bits_portable(&mask[static_cast<size_t>(r * ldm)], ldm);
    }
    std::vector<float> values(static_cast<size_t>(kept[rows]));
    for (auto& v : values) v = u(rng);
    sgk::PanelRows w;
    w.rows = rows;
    w.cols = cols;
    w.mask = mask.data();
    w.ldm = ldm;
    w.kept = kept.data();
    w.values = values.data();
    std::vector<float> bias(rows);
    for (auto& b : bias) b = u(rng);
    for (int64_t S = 16; S <= sgk::kPanelMaxTokens; S += 16) {
      std::vector<float> P(static_cast<size_t>(cols * S));
      for (auto& p : P) p = u(rng);
      std::vector<float> want(static_cast<size_t>(rows * S)), got(want.size());
      sgk::panel_rows_scalar(w, P.data(), S, bias.data(), want.data(), 0, rows);
      for (sgk::Simd simd : simds) {
        std::fill(got.begin(), got.end(), -1.0f);
        sgk::panel_rows(simd, w, P.data(), S, bias.data(), got.data(), 0, rows);
        CHECK(std::memcmp(want.data(), got.data(), want.size() * sizeof(float)) == 0);
      }
      for (int64_t t = 0; t < S; ++t) {
        CHECK(got[static_cast<size_t>(t)] == bias[0]);  // the empty row
        double ref = bias[2];
        const float* v = w.row_values(2);
        ref += static_cast<double>(v[0]) * P[static_cast<size_t>((cols / 2) * S + t)];
        CHECK(std::fabs(got[static_cast<size_t>(2 * S + t)] - ref) <= 1e-6 * (1.0 + std::fabs(ref)));
      }
    }
  }
  for (int bits : {2, 4, 8}) {
    const int64_t rows = 5, cols = 192, group = 64, ldm = cols / 8, groups = cols / group;
    std::vector<uint8_t> mask(static_cast<size_t>(rows * ldm));
    for (auto& m : mask) m = static_cast<uint8_t>(rng());
    std::vector<int64_t> offsets(rows + 1, 0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = sgk::count_bits_portable(&mask[static_cast<size_t>(r * ldm)], ldm);
      offsets[r + 1] = offsets[r] + sgk::code_bytes(n, bits);
    }
    std::vector<uint8_t> codes(static_cast<size_t>(offsets[rows] + sgk::kPadCodeBytes));
    for (auto& c : codes) c = static_cast<uint8_t>(rng() & (bits <= 4 ? 0xFFu : (1u << bits) - 1u));
    std::vector<float> scale(static_cast<size_t>(rows * groups));
    std::vector<uint8_t> zero(scale.size());
    for (size_t i = 0; i < scale.size(); ++i) {
      scale[i] = std::ldexp(1.0f, -static_cast<int>(rng() % 8));
      zero[i] = static_cast<uint8_t>(rng() % (1u << bits));
    }
    for (sgk::Rounding rd : {sgk::Rounding::kFloat32, sgk::Rounding::kBFloat16, sgk::Rounding::kFloat16}) {
      sgk::SparseCodes c;
      c.rows = rows;
      c.cols = cols;
      c.mask = mask.data();
      c.ldm = ldm;
      c.codes = codes.data();
      c.offsets = offsets.data();
      c.scale = scale.data();
      c.zero = zero.data();
      c.group = group;
      c.bits = bits;
      c.rounding = rd;
      std::vector<float> want(static_cast<size_t>(rows * cols + 8)), got(want.size());
      std::vector<int64_t> kw(rows + 1), kg(rows + 1);
      sgk::decode_code_rows_scalar(c, 0, rows, want.data(), kw.data());
      for (sgk::Simd simd : simds) {
        std::fill(got.begin(), got.end(), -1.0f);
        sgk::decode_code_rows(simd, c, 0, rows, got.data(), kg.data());
        CHECK(kw == kg);
        CHECK(std::memcmp(want.data(), got.data(), static_cast<size_t>(kw[rows]) * sizeof(float)) == 0);
      }
    }
  }
}

int main() {
  test_quantize();
  test_nm_group();
  test_select();
  test_sweep();
  test_cholesky();
  test_select_block();
  test_threshold_lanes();
  test_rules();
  test_params_rejected();
  test_sparse_linear();
  test_sparse_codes_bf16();
  test_sparse_panel();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
