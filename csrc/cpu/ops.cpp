// The sparsegpt_kernels::ext_* operators: schemas, CPU implementations (on the torch-free core in csrc/core) and
// shape-only Meta implementations (used by FakeTensor / torch.compile / opcheck).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <ATen/ops/linalg_solve_triangular.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <functional>
#include <limits>
#include <mutex>
#include <string>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../core/sparse_codes.h"
#include "../core/sparse_linear.h"
#include "../core/sparse_panel.h"
#include "../core/sweep_core.h"
#include "../aten/aten_ops.h"

namespace {

at::Tensor nm_keep_mask_cpu(const at::Tensor& scores, int64_t n, int64_t m) {
  sgk_aten::check_nm_args(scores, n, m);
  TORCH_CHECK(scores.device().is_cpu(), "ext_nm_keep_mask (CPU): scores must be a CPU tensor");
  const at::Tensor s = scores.contiguous();
  at::Tensor keep = at::empty(s.sizes(), s.options().dtype(at::kBool));
  const int64_t cols = s.size(-1);
  const int64_t rows = cols ? s.numel() / cols : 0;
  auto* out = reinterpret_cast<uint8_t*>(keep.data_ptr());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "ext_nm_keep_mask", [&] {
    const scalar_t* in = s.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 256, [&](int64_t b, int64_t e) {
      sgk::nm_keep_mask(in + b * cols, e - b, cols, n, m, out + b * cols);
    });
  });
  return keep;
}

at::Tensor unstructured_keep_mask_cpu(const at::Tensor& scores, double sparsity, int64_t block_size) {
  sgk_aten::check_unstructured_mask_args(scores, sparsity, block_size);
  TORCH_CHECK(scores.device().is_cpu(), "ext_unstructured_keep_mask (CPU): scores must be a CPU tensor");
  const at::Tensor s = scores.contiguous();
  at::Tensor keep = at::empty(s.sizes(), s.options().dtype(at::kBool));
  const int64_t rows = s.size(0), cols = s.size(1);
  if (rows == 0 || cols == 0) return keep;
  auto* out = reinterpret_cast<uint8_t*>(keep.data_ptr());
  const int64_t blocks = (cols + block_size - 1) / block_size;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "ext_unstructured_keep_mask", [&] {
    const scalar_t* in = s.const_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
      sgk::unstructured_keep_mask(in, rows, cols, sparsity, block_size, b, e, out);
    });
  });
  return keep;
}

// out = H with dead columns fixed and damping added (the reference's damped_hessian), row-major.
template <typename T>
void damped_copy(const at::Tensor& H, double damp, at::Tensor& out) {
  const int64_t c = H.size(0);
  const T* h = H.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  double sum = 0.0;
  for (int64_t i = 0; i < c; ++i) {
    const T d = h[i * c + i];
    sum += d == T(0) ? 1.0 : static_cast<double>(d);
  }
  const T lam = static_cast<T>(damp * (sum / static_cast<double>(c)));
  at::parallel_for(0, c, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      std::copy(h + i * c, h + (i + 1) * c, o + i * c);
      const T d = o[i * c + i];
      o[i * c + i] = (d == T(0) ? T(1) : d) + lam;
    }
  });
}

// The factorisation's recursion: diagonal blocks of at most kFactorLeaf columns go to LAPACK; the symmetric
// updates split down to kFactorSyrk columns, then run as one GEMM over the whole square (half of it is thrown away).
// Measured on 2 cores at 11008 columns: 2.1-2.4 s against 2.65-2.8 s for a loop over 256-column blocks, whose
// trailing updates were GEMMs with K = 256; here most of the work is GEMMs with K = c/2, c/4, ...
constexpr int64_t kFactorLeaf = 256;
constexpr int64_t kFactorSyrk = 512;

// Where the recursion splits n columns: the lower part a multiple of 128 columns, so that the leaves of the
// factorisation and of the triangular solves on its result are the same blocks.
int64_t factor_split(int64_t n) { return n - (n / 2 + 127) / 128 * 128; }

// Upper triangle of C (n, n) -= P P^T, P (n, k).
void syrk_upper_sub(at::Tensor C, const at::Tensor& P) {
  const int64_t n = C.size(0);
  if (n <= kFactorSyrk) {
    C.addmm_(P, P.t(), /*beta=*/1, /*alpha=*/-1);
    return;
  }
  const int64_t h = n / 2;
  syrk_upper_sub(C.slice(0, 0, h).slice(1, 0, h), P.slice(0, 0, h));
  C.slice(0, 0, h).slice(1, h, n).addmm_(P.slice(0, 0, h), P.slice(0, h, n).t(), /*beta=*/1, /*alpha=*/-1);
  syrk_upper_sub(C.slice(0, h, n).slice(1, h, n), P.slice(0, h, n));
}

// B (m, n) <- B R^-T for the (n, n) block R of the factor whose first column is `off` (R's upper triangle, junk
// below it), using the inverses of its leaves (inv[a leaf's first column]).
void solve_right_upper_t(at::Tensor B, const at::Tensor& R, int64_t off, const std::vector<at::Tensor>& inv) {
  const int64_t n = R.size(0);
  if (n <= kFactorLeaf) {
    B.copy_(at::mm(B, inv[off].t()));
    return;
  }
  const int64_t h = factor_split(n);
  solve_right_upper_t(B.slice(1, h, n), R.slice(0, h, n).slice(1, h, n), off + h, inv);
  B.slice(1, 0, h).addmm_(B.slice(1, h, n), R.slice(0, 0, h).slice(1, h, n).t(), /*beta=*/1, /*alpha=*/-1);
  solve_right_upper_t(B.slice(1, 0, h), R.slice(0, 0, h).slice(1, 0, h), off, inv);
}

// In place on the (n, n) block A (first column `off` of the whole matrix): its upper triangle becomes R, upper
// triangular with A = R R^T (the reversed Cholesky factor; the strict lower triangle is left holding junk).
// Recursively: with A = [A11 A12; A21 A22], R22 = rchol(A22), R12 = A12 R22^-T, R11 = rchol(A11 - R12 R12^T); a
// leaf is J chol(J A J) J (LAPACK on a flipped copy), and its inverse is kept for the triangular solves.
// Returns 0, or the 1-based column (of the whole matrix) of the first failing pivot, counted from the bottom-right.
int64_t upper_lower_cholesky_sub(at::Tensor A, int64_t off, std::vector<at::Tensor>& inv) {
  const int64_t n = A.size(0);
  if (n <= kFactorLeaf) {
    auto [L, info] = at::linalg_cholesky_ex(A.flip({0, 1}), /*upper=*/false);
    const int64_t bad = info.item<int64_t>();
    if (bad != 0) return off + n - bad + 1;  // reversed order: the failing pivot counted from the block's end
    const at::Tensor Rd = L.flip({0, 1});  // upper triangular, zeros below the diagonal
    A.copy_(Rd);
    inv[off] = at::linalg_solve_triangular(Rd, at::eye(n, A.options()), /*upper=*/true);
    return 0;
  }
  const int64_t h = factor_split(n);
  at::Tensor A22 = A.slice(0, h, n).slice(1, h, n), A12 = A.slice(0, 0, h).slice(1, h, n);
  if (const int64_t bad = upper_lower_cholesky_sub(A22, off + h, inv)) return bad;
  solve_right_upper_t(A12, A22, off + h, inv);
  syrk_upper_sub(A.slice(0, 0, h).slice(1, 0, h), A12);
  return upper_lower_cholesky_sub(A.slice(0, 0, h).slice(1, 0, h), off, inv);
}

int64_t upper_lower_cholesky(at::Tensor& A) {
  std::vector<at::Tensor> inv(static_cast<size_t>(A.size(0)));  // by the leaf's first column
  return upper_lower_cholesky_sub(A, 0, inv);
}

// Zeros R's strict lower triangle; returns false when its upper triangle has a non-finite entry or its diagonal a
// non-positive one.
template <typename T>
bool finish_upper(at::Tensor& R) {
  const int64_t c = R.size(0);
  T* r = R.mutable_data_ptr<T>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, c, 64, [&](int64_t b, int64_t e) {
    bool good = true;
    for (int64_t i = b; i < e; ++i) {
      T* row = r + i * c;
      std::fill(row, row + i, T(0));
      good = good && row[i] > T(0);
      for (int64_t j = i; j < c; ++j) good = good && std::isfinite(row[j]);
    }
    if (!good) ok.store(false);
  });
  return ok.load();
}

std::tuple<at::Tensor, at::Tensor> cholesky_factor_cpu(const at::Tensor& H, double damp) {
  sgk_aten::check_factor_args(H, damp, "ext_cholesky_factor");
  TORCH_CHECK(H.device().is_cpu(), "ext_cholesky_factor (CPU): H must be a CPU tensor");
  const int64_t c = H.size(0);
  if (c == 0) return {at::empty({0, 0}, H.options()), at::zeros({}, H.options().dtype(at::kInt))};
  // on huge pages (see sgk::alloc_big): the trailing updates' GEMMs walk it in rows c entries apart
  at::Tensor R = at::from_blob(sgk::alloc_big(static_cast<size_t>(c * c) * H.element_size()), {c, c},
                               [](void* p) { sgk::free_big(p); }, H.options());
  const at::Tensor Hc = H.contiguous();
  AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "ext_cholesky_factor", [&] { damped_copy<scalar_t>(Hc, damp, R); });
  int64_t status = upper_lower_cholesky(R);
  if (status == 0) {
    bool ok = true;
    AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "ext_cholesky_factor", [&] { ok = finish_upper<scalar_t>(R); });
    if (!ok) status = -1;
  }
  return {R, at::scalar_tensor(status, H.options().dtype(at::kInt))};
}

// Seconds per sgk::Phase of the last CPU sweep in this process (what ext_last_sweep_phases returns).
std::array<double, sgk::kNumPhases> g_last_phases{};
std::mutex g_last_phases_mutex;

std::vector<double> last_sweep_phases() {
  std::lock_guard<std::mutex> lock(g_last_phases_mutex);
  return {g_last_phases.begin(), g_last_phases.end()};
}

// SPARSEGPT_KERNELS_CPU_SIMD: the widest instruction set the in-block steps may use, "avx512" (the default),
// "avx2" or "baseline" (for tests and comparisons; the results are the same bits); anything else is an error.
sgk::Simd simd_allowed() {
  const char* env = std::getenv("SPARSEGPT_KERNELS_CPU_SIMD");
  const std::string simd = env == nullptr ? "" : env;
  if (simd.empty() || simd == "avx512" || simd == "auto") return sgk::Simd::kAvx512;
  if (simd == "avx2") return sgk::Simd::kAvx2;
  if (simd == "baseline") return sgk::Simd::kBaseline;
  TORCH_CHECK(false, "SPARSEGPT_KERNELS_CPU_SIMD=", simd, " is not one of avx512, avx2, baseline");
}

// Whether the panel kernel runs a SIMD copy here (AVX-512 or AVX2 allowed and present); without one the op computes
// the same bits one product at a time, which SparseLinear does not use for speed.
bool panel_simd() {
  const sgk::Simd simd = sgk::simd_used(simd_allowed());
  return (simd == sgk::Simd::kAvx512 && sgk::cpu_has_panel()) ||
         (simd != sgk::Simd::kBaseline && sgk::cpu_has_panel_avx2());
}

// Whether the row kernels take bfloat16 x and values as they are (AVX512-BF16 dot products, AVX-512 allowed).
bool bf16_dot_simd() { return sgk::simd_used(simd_allowed()) == sgk::Simd::kAvx512 && sgk::cpu_has_bf16_dot(); }

std::string cpu_simd() { return sgk::simd_name(sgk::simd_used(simd_allowed())); }

// The sweep on either factor (see sgk::Factor). kCholesky keeps its lazy updates in a scratch buffer of W's shape.
at::Tensor sweep_cpu_impl(const at::Tensor& W, const at::Tensor& G, double sparsity, int64_t n, int64_t m,
                          int64_t block_size, const std::optional<at::Tensor>& scale,
                          const std::optional<at::Tensor>& zero, int64_t maxq, int64_t group_size,
                          sgk::Factor factor, const char* name) {
  sgk_aten::check_sweep_args(W, G, sparsity, n, m, block_size, scale, zero, maxq, group_size, name);
  TORCH_CHECK(W.device().is_cpu(), name, " (CPU): W must be a CPU tensor");
  const at::Tensor Gc = G.contiguous();
  const at::Tensor sc = scale.has_value() ? scale->contiguous() : at::Tensor();
  const at::Tensor zc = zero.has_value() ? zero->contiguous() : at::Tensor();
  const int64_t rows = W.size(0), cols = W.size(1);
  const bool chol = factor == sgk::Factor::kCholesky;
  double loss = 0.0;
  std::array<double, sgk::kNumPhases> phases{};
  const sgk::Simd simd = simd_allowed();
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "ext_sweep", [&] {
    sgk::SweepParams<scalar_t> p;
    p.rows = rows;
    p.cols = cols;
    p.W = W.mutable_data_ptr<scalar_t>();
    p.ldw = cols;
    p.G = Gc.const_data_ptr<scalar_t>();
    p.ldg = cols;
    p.factor = factor;
    // kCholesky's lazy updates, (rows, cols), on huge pages where the OS has them (see sgk::BigBuffer)
    sgk::BigBuffer<scalar_t> A(chol && cols > block_size ? static_cast<size_t>(rows * cols) : 0);
    if (A.size() > 0) {
      p.A = A.data();
      p.lda = cols;
    }
    p.sparsity = sparsity;
    p.n = n;
    p.m = m;
    p.block_size = block_size;
    p.phase_seconds = phases.data();
    p.simd = simd;
    if (sc.defined()) {
      p.scale = sc.const_data_ptr<scalar_t>();
      p.zero = zc.const_data_ptr<scalar_t>();
      p.ldq = sc.size(1);
      p.group_size = group_size;
      p.maxq = maxq;
    }
    auto parallel = [](int64_t ntasks, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
      at::parallel_for(0, ntasks, grain, fn);
    };
    // C (m, n) = beta * C + A @ B on row-major buffers, through ATen's BLAS (no copies: strided views)
    auto gemm = [&](int64_t mm, int64_t nn, int64_t kk, const scalar_t* a, int64_t lda, const scalar_t* b,
                    int64_t ldb, scalar_t* c, int64_t ldc, int beta) {
      const at::TensorOptions o = W.options();
      const at::Tensor At = at::from_blob(const_cast<scalar_t*>(a), {mm, kk}, {lda, 1}, o);
      const at::Tensor Bt = at::from_blob(const_cast<scalar_t*>(b), {kk, nn}, {ldb, 1}, o);
      at::Tensor Ct = at::from_blob(c, {mm, nn}, {ldc, 1}, o);
      Ct.addmm_(At, Bt, /*beta=*/beta, /*alpha=*/1);
    };
    loss = sgk::sweep(p, parallel, gemm);
  });
  {
    std::lock_guard<std::mutex> lock(g_last_phases_mutex);
    g_last_phases = phases;
  }
  return at::scalar_tensor(loss, W.options());
}

at::Tensor sweep_cpu(const at::Tensor& W, const at::Tensor& U, double sparsity, int64_t n, int64_t m,
                     int64_t block_size, const std::optional<at::Tensor>& scale,
                     const std::optional<at::Tensor>& zero, int64_t maxq, int64_t group_size) {
  return sweep_cpu_impl(W, U, sparsity, n, m, block_size, scale, zero, maxq, group_size, sgk::Factor::kInverse,
                        "ext_sweep");
}

at::Tensor sweep_cholesky_cpu(const at::Tensor& W, const at::Tensor& R, double sparsity, int64_t n, int64_t m,
                              int64_t block_size, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& zero, int64_t maxq, int64_t group_size) {
  return sweep_cpu_impl(W, R, sparsity, n, m, block_size, scale, zero, maxq, group_size, sgk::Factor::kCholesky,
                        "ext_sweep_cholesky");
}

// An uninitialised contiguous CPU tensor on huge pages (sgk::alloc_big), for prune_layer's working copy of W.
at::Tensor empty_big(at::IntArrayRef size, at::ScalarType dtype) {
  int64_t n = 1;
  for (int64_t s : size) {
    TORCH_CHECK(s >= 0, "ext_empty_big: negative size ", size);
    n *= s;
  }
  const auto opts = at::TensorOptions().dtype(dtype).device(at::kCPU);
  return at::from_blob(sgk::alloc_big(static_cast<size_t>(n) * c10::elementSize(dtype)), size,
                       [](void* p) { sgk::free_big(p); }, opts);
}

// Frees the idle buffers sgk::BigCache keeps for reuse; returns the bytes freed.
int64_t release_cpu_cache() { return static_cast<int64_t>(sgk::BigCache::instance().release()); }

int64_t cpu_cache_idle_bytes() { return static_cast<int64_t>(sgk::BigCache::instance().idle_bytes()); }

// ---- value checks of prune_layer's inputs and output, one pass each ----
// Written as independent lanes (kCheckLanes accumulators, no early exit, no branches) so that the compiler
// vectorizes them. Finiteness: x - x is 0 for finite x and NaN otherwise, and a sum of those stays 0 or becomes NaN.

constexpr int64_t kCheckLanes = 16;
// Tile side of hessian_stats: a tile and its mirror image both stay in cache while compared.
constexpr int64_t kCheckTile = 256;
constexpr int64_t kCheckSub = 16;

// [min, max, max |H - H^T|, all finite (1 or 0)] of a square matrix, reading every entry once: tile (I, J) with
// J >= I against the transpose of tile (J, I) (copied transposed first, so both are read along rows, in whole
// tiles: the compiler vectorizes the fixed-length loop).
// min/max/asymmetry are meaningful only when every entry is finite.
std::vector<double> hessian_stats_cpu(const at::Tensor& H) {
  TORCH_CHECK(H.dim() == 2 && H.size(0) == H.size(1), "ext_hessian_stats: H must be square, got ", H.sizes());
  TORCH_CHECK(H.device().is_cpu(), "ext_hessian_stats (CPU): H must be a CPU tensor");
  const at::Tensor Hc = H.contiguous();
  const int64_t c = Hc.size(0), nt = (c + kCheckTile - 1) / kCheckTile;
  if (c == 0) return {0.0, 0.0, 0.0, 1.0};
  double lo = std::numeric_limits<double>::infinity(), hi = -lo, asym = 0, bad = 0;
  std::mutex mu;
  AT_DISPATCH_FLOATING_TYPES(Hc.scalar_type(), "ext_hessian_stats", [&] {
    using T = scalar_t;
    const T* h = Hc.const_data_ptr<T>();
    // the upper triangle's tile pairs, numbered row by row: pair p is (I, J) with J >= I
    std::vector<int64_t> pi, pj;
    for (int64_t I = 0; I < nt; ++I)
      for (int64_t J = I; J < nt; ++J) pi.push_back(I), pj.push_back(J);
    at::parallel_for(0, static_cast<int64_t>(pi.size()), 1, [&](int64_t b, int64_t e) {
      constexpr T inf = std::numeric_limits<T>::infinity();
      T vlo[kCheckLanes], vhi[kCheckLanes], vas[kCheckLanes], vbad[kCheckLanes];
      std::fill(vlo, vlo + kCheckLanes, inf);
      std::fill(vhi, vhi + kCheckLanes, -inf);
      std::fill(vas, vas + kCheckLanes, T(0));
      std::fill(vbad, vbad + kCheckLanes, T(0));
      // the tile and its mirror image, transposed; past the matrix's edge both hold the tile's first entry, which
      // leaves min, max, asymmetry and finiteness as they are
      std::vector<T> at(kCheckTile * kCheckTile), mt(kCheckTile * kCheckTile);
      for (int64_t q = b; q < e; ++q) {
        const int64_t i0 = pi[q] * kCheckTile, ni = std::min(c - i0, kCheckTile);
        const int64_t j0 = pj[q] * kCheckTile, nj = std::min(c - j0, kCheckTile);
        if (ni < kCheckTile || nj < kCheckTile) {
          std::fill(at.begin(), at.end(), h[i0 * c + j0]);
          std::fill(mt.begin(), mt.end(), h[i0 * c + j0]);
        }
        for (int64_t ii = 0; ii < ni; ++ii) std::copy(h + (i0 + ii) * c + j0, h + (i0 + ii) * c + j0 + nj,
                                                      at.begin() + ii * kCheckTile);
        // transposed in (kCheckSub, kCheckSub) squares: the lines of mt one square writes stay in L1 until it is done
        for (int64_t jj0 = 0; jj0 < nj; jj0 += kCheckSub) {
          for (int64_t ii0 = 0; ii0 < ni; ii0 += kCheckSub) {
            const int64_t jn = std::min(nj, jj0 + kCheckSub), in = std::min(ni, ii0 + kCheckSub);
            for (int64_t jj = jj0; jj < jn; ++jj) {
              const T* mrow = h + (j0 + jj) * c + i0;
              for (int64_t ii = ii0; ii < in; ++ii) mt[ii * kCheckTile + jj] = mrow[ii];
            }
          }
        }
        for (int64_t k = 0; k < kCheckTile * kCheckTile; k += kCheckLanes) {
          for (int64_t l = 0; l < kCheckLanes; ++l) {
            const T x = at[k + l], y = mt[k + l];
            const T mn = x < y ? x : y, mx = x < y ? y : x, d = x < y ? y - x : x - y;
            vlo[l] = mn < vlo[l] ? mn : vlo[l];
            vhi[l] = mx > vhi[l] ? mx : vhi[l];
            vas[l] = d > vas[l] ? d : vas[l];
            vbad[l] += (x - x) + (y - y);
          }
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      for (int64_t l = 0; l < kCheckLanes; ++l) {
        lo = std::min(lo, static_cast<double>(vlo[l]));
        hi = std::max(hi, static_cast<double>(vhi[l]));
        asym = std::max(asym, static_cast<double>(vas[l]));
        bad += static_cast<double>(vbad[l]);
      }
    });
  });
  return {lo, hi, asym, bad == 0 ? 1.0 : 0.0};
}

// [number of non-zero entries, all finite (1 or 0)] of a tensor, one pass.
std::vector<int64_t> nonzeros_finite_cpu(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "ext_nonzeros_finite (CPU): t must be a CPU tensor");
  const at::Tensor tc = t.contiguous();
  const int64_t n = tc.numel();
  std::atomic<int64_t> nonzeros{0};
  std::atomic<bool> finite{true};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tc.scalar_type(), "ext_nonzeros_finite", [&] {
    // half and bfloat16 are counted in float (exact); float and double as they are
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = tc.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, int64_t{1} << 16, [&](int64_t b, int64_t e) {
      int32_t vnz[kCheckLanes] = {};
      A vbad[kCheckLanes] = {};
      int64_t nz = 0;
      int64_t i = b;
      for (; i + kCheckLanes <= e; i += kCheckLanes) {
        for (int64_t l = 0; l < kCheckLanes; ++l) {
          const A y = static_cast<A>(x[i + l]);
          vnz[l] += y != A(0);
          vbad[l] += y - y;
        }
        if (((i - b) & ((int64_t{1} << 24) - 1)) == 0) {  // before an int32 lane could overflow
          for (int64_t l = 0; l < kCheckLanes; ++l) nz += vnz[l], vnz[l] = 0;
        }
      }
      A sbad = 0;
      for (; i < e; ++i) {
        const A y = static_cast<A>(x[i]);
        nz += y != A(0);
        sbad += y - y;
      }
      for (int64_t l = 0; l < kCheckLanes; ++l) nz += vnz[l], sbad += vbad[l];
      nonzeros += nz;
      if (!(sbad == A(0))) finite.store(false);
    });
  });
  return {nonzeros.load(), finite.load() ? 1 : 0};
}

// The compressed weight as the core reads it (csrc/core/sparse_linear.h).
template <typename V>
sgk::SparseRows<V> sparse_rows_view(const at::Tensor& mask, const V* values, const int64_t* offsets, int64_t cols) {
  sgk::SparseRows<V> w;
  w.rows = mask.size(0);
  w.cols = cols;
  w.mask = mask.const_data_ptr<uint8_t>();
  w.ldm = mask.size(1);
  w.values = values;
  w.offsets = offsets;
  return w;
}

// The entries row r of a compressed weight holds: its kept values (or, for codes, the bytes of its kept codes).
template <typename V>
int64_t row_entries(const sgk::SparseRows<V>&, int64_t count) {
  return count;
}
inline int64_t row_entries(const sgk::SparseCodes& w, int64_t count) { return sgk::code_bytes(count, w.bits); }

// fn(begin, end) over ranges of rows in parallel, each run of up to `grain` rows checked just before fn reads it (its
// mask is then still in the cache): row r's span of offsets must be what its mask's popcount says (row_entries) and
// lie within [0, offsets[rows]], so that no read goes beyond the buffer the caller checked against offsets[rows].
// Returns a row that failed, or -1; fn has then not seen that row or any after it in its range.
template <typename W, typename Fn>
int64_t for_checked_rows(const W& w, sgk::Simd simd, int64_t grain, Fn&& fn) {
  std::atomic<int64_t> bad_row{-1};
  const int64_t end = w.offsets[w.rows];
  at::parallel_for(0, w.rows, grain, [&](int64_t b, int64_t e) {
    for (int64_t r0 = b; r0 < e; r0 += grain) {
      const int64_t r1 = std::min(e, r0 + grain);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t count = sgk::count_bits(simd, w.mask + r * w.ldm, w.ldm);
        if (w.offsets[r] < 0 || w.offsets[r + 1] > end || w.offsets[r + 1] - w.offsets[r] != row_entries(w, count)) {
          bad_row.store(r);
          return;
        }
      }
      fn(r0, r1);
    }
  });
  return bad_row.load();
}

// The float32 rows of x and of y for a decode call, without the dispatcher's temporaries (x.to(float), an empty y,
// y.to(x's dtype): about 1-4 us of a call that is a few us of kernel at the decode shapes of a small model). Small
// calls use buffers of the calling thread (the worker threads of at::parallel_for write into y through the pointer);
// larger ones, which a buffer kept per thread would make resident for good, use tensors.
constexpr int64_t kThreadBufferFloats = 1 << 16;

// The shape of y = x Wᵀ: x's, with `rows` for its last dimension.
std::vector<int64_t> out_shape(const at::Tensor& x, int64_t rows) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = rows;
  return shape;
}

// n floats: a buffer of the calling thread (`buf`) for small calls, else a fresh tensor kept in t.
float* scratch_floats(std::vector<float>& buf, at::Tensor& t, int64_t n) {
  if (n > kThreadBufferFloats) {
    t = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
    return t.data_ptr<float>();
  }
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}
thread_local std::vector<float> x_floats, y_floats;

// out (bfloat16, n entries) = y rounded to nearest even, as Tensor.to rounds.
void write_bf16(at::Tensor& out, const float* y, int64_t n) {
  auto* o = out.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < n; ++i) o[i] = c10::BFloat16(y[i]);
}

class Float32Rows {
 public:
  // x (..., cols) float32 or bfloat16; y gets shape (..., rows) in x's dtype
  Float32Rows(const at::Tensor& x, int64_t rows) : rows_(rows) {
    const int64_t n = x.numel();
    tokens_ = 1;
    for (int64_t d = 0; d + 1 < x.dim(); ++d) tokens_ *= x.size(d);
    out_ = at::empty(out_shape(x, rows), x.options());
    if (x.scalar_type() == at::kFloat) {
      xt_ = x.contiguous();
      x_ = xt_.const_data_ptr<float>();
      y_ = out_.data_ptr<float>();
      return;
    }
    const at::Tensor xb = x.contiguous();
    const auto* p = reinterpret_cast<const uint16_t*>(xb.const_data_ptr<at::BFloat16>());
    float* xf = scratch_floats(x_floats, xt_, n);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t u = static_cast<uint32_t>(p[i]) << 16;
      std::memcpy(xf + i, &u, sizeof(u));
    }
    x_ = xf;
    y_ = scratch_floats(y_floats, yt_, tokens_ * rows);
  }
  const float* x() const { return x_; }
  float* y() const { return y_; }
  int64_t tokens() const { return tokens_; }
  // y in x's dtype
  at::Tensor finish() {
    if (out_.scalar_type() == at::kBFloat16) write_bf16(out_, y_, tokens_ * rows_);
    return out_;
  }

 private:
  int64_t rows_, tokens_ = 0;
  at::Tensor out_, xt_, yt_;
  const float* x_ = nullptr;
  float* y_ = nullptr;
};

// The row check's verdict (for_checked_rows): what = "the number of bits set in" or "the code bytes of".
void check_rows(int64_t bad_row, const char* op, const char* what) {
  TORCH_CHECK(bad_row < 0, op, ": offsets[", bad_row, " + 1] - offsets[", bad_row, "] is not ", what, " mask row ",
              bad_row);
}

// The bfloat16 dot-product path of a kernel: x read as it is; fn(x bits, tokens, y) fills y in float32 (a buffer of
// the calling thread for small calls, as in Float32Rows), which is then rounded to x's dtype, shape (..., rows).
template <typename Fn>
at::Tensor bf16_dot_call(const at::Tensor& x, int64_t rows, Fn&& fn) {
  const at::Tensor xc = x.contiguous();
  const int64_t tokens = xc.numel() / x.size(-1);  // callers take this path for a non-empty x
  at::Tensor out = at::empty(out_shape(x, rows), x.options()), yt;
  float* y = scratch_floats(y_floats, yt, tokens * rows);
  fn(reinterpret_cast<const uint16_t*>(xc.const_data_ptr<at::BFloat16>()), tokens, y);
  write_bf16(out, y, tokens * rows);
  return out;
}

// The float32 path of a kernel: fn(x as float32 rows, tokens, y) fills y in float32 (Float32Rows), returned in x's
// dtype, shape (..., rows).
template <typename Fn>
at::Tensor float32_call(const at::Tensor& x, int64_t rows, Fn&& fn) {
  Float32Rows io(x, rows);
  fn(io.x(), io.tokens(), io.y());
  return io.finish();
}

// y = x Wᵀ + b from a compressed weight (csrc/core/sparse_linear.h; docs/sparse_format.md): x (..., cols) float32 or
// bfloat16, mask (rows, ceil(cols / 8)) uint8, values float32 or bfloat16 with at least offsets[rows] + kPadValues
// entries, offsets (rows + 1) int64 with offsets[r + 1] - offsets[r] the number of bits set in mask row r (checked as
// the rows are read), bias (rows) or none. Computes in float32; y has x's dtype and shape (..., rows).
void check_sparse_linear_args(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
                              const at::Tensor& offsets, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, "ext_sparse_linear: x must have at least one dimension");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "ext_sparse_linear: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kByte, "ext_sparse_linear: mask must be 2-D uint8, got ",
              mask.scalar_type(), " ", mask.sizes());
  const int64_t rows = mask.size(0), cols = x.size(-1);
  TORCH_CHECK(mask.size(1) == (cols + 7) / 8, "ext_sparse_linear: mask has ", mask.size(1), " bytes per row, x has ",
              cols, " columns (needs ", (cols + 7) / 8, ")");
  TORCH_CHECK(values.dim() == 1 && (values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16),
              "ext_sparse_linear: values must be 1-D float32 or bfloat16, got ", values.scalar_type(), " ",
              values.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == rows + 1 && offsets.scalar_type() == at::kLong,
              "ext_sparse_linear: offsets must be int64 of shape (", rows + 1, "), got ", offsets.scalar_type(), " ",
              offsets.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == rows && bias->is_floating_point(),
                "ext_sparse_linear: bias must be a floating-point vector of ", rows, " entries, got ", bias->sizes());
  }
}

at::Tensor sparse_linear_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
                             const at::Tensor& offsets, const std::optional<at::Tensor>& bias) {
  check_sparse_linear_args(x, mask, values, offsets, bias);
  for (const at::Tensor* t : {&x, &mask, &values, &offsets}) {
    TORCH_CHECK(t->device().is_cpu(), "ext_sparse_linear (CPU): every tensor must be on the CPU");
  }
  const int64_t rows = mask.size(0), cols = x.size(-1);
  const at::Tensor m = mask.contiguous(), v = values.contiguous(), off = offsets.contiguous();
  const sgk::Simd simd = sgk::simd_used(simd_allowed());
  // bfloat16 x and values on a CPU with bfloat16 dot products: x is read as it is (at 1 token too, with four
  // accumulator chains: 2.0-2.8x the float32 path there on an AVX-512 Xeon, benchmarks/RESULTS.md)
  const bool bf16_dot = x.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 &&
                        simd == sgk::Simd::kAvx512 && sgk::cpu_has_bf16_dot() && x.numel() > 0;
  const int64_t* o = off.const_data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0 && o[rows] + sgk::kPadValues <= v.numel(), "ext_sparse_linear: values hold ", v.numel(),
              " entries, the offsets need ", o[rows], " + ", sgk::kPadValues, " (padding)");
  std::optional<at::Tensor> bf;
  if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
  const float* bp = bf ? bf->const_data_ptr<float>() : nullptr;
  const auto* vb = reinterpret_cast<const uint16_t*>(v.scalar_type() == at::kBFloat16
                                                        ? v.const_data_ptr<at::BFloat16>() : nullptr);
  const char* what = "the number of bits set in";
  if (bf16_dot) {
    const auto w = sparse_rows_view(m, vb, o, cols);
    return bf16_dot_call(x, rows, [&](const uint16_t* xb, int64_t T, float* yp) {
      check_rows(for_checked_rows(w, simd, 16, [&](int64_t b, int64_t e) {
                   sgk::sparse_rows_bf16(w, xb, T, cols, bp, yp, rows, b, e);
                 }), "ext_sparse_linear", what);
    });
  }
  return float32_call(x, rows, [&](const float* xp, int64_t T, float* yp) {
    auto run = [&](auto* vals) {
      const auto w = sparse_rows_view(m, vals, o, cols);
      return for_checked_rows(w, simd, 16, [&](int64_t b, int64_t e) {
        sgk::sparse_rows(simd, w, xp, T, cols, bp, yp, rows, b, e);
      });
    };
    check_rows(vb == nullptr ? run(v.const_data_ptr<float>()) : run(vb), "ext_sparse_linear", what);
  });
}

// The dense (rows, cols) weight of a compressed one, in the values' dtype (float32 or bfloat16), bit for bit: what
// SparseLinear multiplies with for prefill. The offsets are checked against the mask as in ext_sparse_linear.
at::Tensor sparse_to_dense_cpu(const at::Tensor& mask, const at::Tensor& values, const at::Tensor& offsets,
                               int64_t cols) {
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kByte && mask.size(1) == (cols + 7) / 8,
              "ext_sparse_to_dense: mask must be uint8 (rows, ", (cols + 7) / 8, "), got ", mask.scalar_type(), " ",
              mask.sizes());
  TORCH_CHECK(values.dim() == 1 && (values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16),
              "ext_sparse_to_dense: values must be 1-D float32 or bfloat16");
  const int64_t rows = mask.size(0);
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == rows + 1 && offsets.scalar_type() == at::kLong,
              "ext_sparse_to_dense: offsets must be int64 of shape (", rows + 1, ")");
  for (const at::Tensor* t : {&mask, &values, &offsets}) {
    TORCH_CHECK(t->device().is_cpu(), "ext_sparse_to_dense (CPU): every tensor must be on the CPU");
  }
  const at::Tensor m = mask.contiguous(), v = values.contiguous(), off = offsets.contiguous();
  const int64_t* o = off.const_data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0 && o[rows] <= v.numel(), "ext_sparse_to_dense: values hold ", v.numel(),
              " entries, the offsets need ", o[rows]);
  // from the cache of big buffers (csrc/core/big_buffer.h): a prompt decompresses layer after layer of the same few
  // shapes, and fresh memory costs a page fault per page (about as long as the decompression itself)
  at::Tensor out = empty_big({rows, cols}, v.scalar_type());
  const sgk::Simd simd = sgk::simd_used(simd_allowed());
  auto run = [&](auto* vals, auto* dst) {
    const auto w = sparse_rows_view(m, vals, o, cols);
    return for_checked_rows(w, simd, 64,
                            [&](int64_t b, int64_t e) { sgk::sparse_rows_to_dense(simd, w, dst, b, e); });
  };
  const int64_t bad_row = v.scalar_type() == at::kFloat
                              ? run(v.const_data_ptr<float>(), out.data_ptr<float>())
                              : run(reinterpret_cast<const uint16_t*>(v.const_data_ptr<at::BFloat16>()),
                                    reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  check_rows(bad_row, "ext_sparse_to_dense", "the number of bits set in");
  return out;
}

// ---- jointly quantized compressed weights (csrc/core/sparse_codes.h) ----
sgk::Rounding rounding_of(at::ScalarType dtype, const char* op) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": dtype must be float32, bfloat16 or float16, got ", dtype);
  return dtype == at::kBFloat16 ? sgk::Rounding::kBFloat16
         : dtype == at::kHalf   ? sgk::Rounding::kFloat16
                                : sgk::Rounding::kFloat32;
}

// Checks the tensors of a quantized weight of `cols` columns (mask, codes, offsets, scale, zero) and returns the core's
// view of them (contiguous copies kept alive in `keep`). `pad`: bytes the codes must hold beyond offsets[rows].
sgk::SparseCodes sparse_codes_view(const at::Tensor& mask, const at::Tensor& codes, const at::Tensor& offsets,
                                   const at::Tensor& scale, const at::Tensor& zero, int64_t bits, int64_t group,
                                   at::ScalarType dtype, int64_t cols, int64_t pad, const char* op,
                                   std::vector<at::Tensor>& keep) {
  TORCH_CHECK(cols >= 1, op, ": the weight needs at least one column");
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kByte && mask.size(1) == (cols + 7) / 8, op,
              ": mask must be uint8 (rows, ", (cols + 7) / 8, ") for ", cols, " columns, got ", mask.scalar_type(),
              " ", mask.sizes());
  const int64_t rows = mask.size(0);
  TORCH_CHECK(bits >= 1 && bits <= 8, op, ": bits must be in 1..8, got ", bits);
  TORCH_CHECK(group >= 1 && cols % group == 0, op, ": group_size must be a positive divisor of ", cols, ", got ",
              group);
  TORCH_CHECK(codes.dim() == 1 && codes.scalar_type() == at::kByte, op, ": codes must be 1-D uint8, got ",
              codes.scalar_type(), " ", codes.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == rows + 1 && offsets.scalar_type() == at::kLong, op,
              ": offsets must be int64 of shape (", rows + 1, "), got ", offsets.scalar_type(), " ", offsets.sizes());
  const std::vector<int64_t> gshape{rows, cols / group};
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.sizes() == at::IntArrayRef(gshape), op,
              ": scale must be float32 of shape (", rows, ", ", cols / group, "), got ", scale.scalar_type(), " ",
              scale.sizes());
  TORCH_CHECK(zero.scalar_type() == at::kByte && zero.sizes() == at::IntArrayRef(gshape), op,
              ": zero must be uint8 of shape (", rows, ", ", cols / group, "), got ", zero.scalar_type(), " ",
              zero.sizes());
  for (const at::Tensor* t : {&mask, &codes, &offsets, &scale, &zero}) {
    TORCH_CHECK(t->device().is_cpu(), op, " (CPU): every tensor must be on the CPU");
    keep.push_back(t->contiguous());
  }
  sgk::SparseCodes w;
  w.rows = rows;
  w.cols = cols;
  w.mask = keep[0].const_data_ptr<uint8_t>();
  w.ldm = mask.size(1);
  w.codes = keep[1].const_data_ptr<uint8_t>();
  w.offsets = keep[2].const_data_ptr<int64_t>();
  w.scale = keep[3].const_data_ptr<float>();
  w.zero = keep[4].const_data_ptr<uint8_t>();
  w.group = group;
  w.bits = static_cast<int>(bits);
  w.rounding = rounding_of(dtype, op);
  TORCH_CHECK(w.offsets[0] == 0 && w.offsets[rows] >= 0 && w.offsets[rows] + pad <= codes.numel(), op, ": codes hold ",
              codes.numel(), " bytes, the offsets need ", w.offsets[rows], " + ", pad, " (padding)");
  return w;
}

// y = x Wᵀ + b from a jointly quantized compressed weight: x (..., cols) float32 or bfloat16, mask (rows, ceil(cols /
// 8)) uint8, codes uint8 with at least offsets[rows] + kPadCodeBytes bytes, offsets (rows + 1) int64 (row r's codes
// are bytes [offsets[r], offsets[r + 1]), checked against the mask as the rows are read), scale (rows, cols / group)
// float32, zero the same shape uint8, dtype the model's (the rounding of every dequantized weight), bias (rows) or
// none. Computes in float32; y has x's dtype and shape (..., rows).
void check_codes_x(const at::Tensor& x, const at::Tensor& mask, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, "ext_sparse_codes_linear: x must have at least one dimension");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "ext_sparse_codes_linear: x must be float32 or bfloat16, got ", x.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == mask.size(0) && bias->is_floating_point(),
                "ext_sparse_codes_linear: bias must be a floating-point vector of ", mask.size(0), " entries, got ",
                bias->sizes());
  }
}

at::Tensor sparse_codes_linear_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& codes,
                                   const at::Tensor& offsets, const at::Tensor& scale, const at::Tensor& zero,
                                   int64_t bits, int64_t group_size, at::ScalarType dtype,
                                   const std::optional<at::Tensor>& bias) {
  check_codes_x(x, mask, bias);
  TORCH_CHECK(x.device().is_cpu(), "ext_sparse_codes_linear (CPU): every tensor must be on the CPU");
  const int64_t cols = x.size(-1);
  std::vector<at::Tensor> keep;
  const sgk::SparseCodes w = sparse_codes_view(mask, codes, offsets, scale, zero, bits, group_size, dtype, cols,
                                               sgk::kPadCodeBytes, "ext_sparse_codes_linear", keep);
  const sgk::Simd simd = sgk::simd_used(simd_allowed());
  // bfloat16 activations of a bfloat16 model: the bfloat16 dot products, as for values
  const bool bf16_dot = x.scalar_type() == at::kBFloat16 && x.numel() > 0 && sgk::code_bf16_dot_takes(simd, w);
  const int64_t rows = w.rows;
  std::optional<at::Tensor> bf;
  if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
  const float* bp = bf ? bf->const_data_ptr<float>() : nullptr;
  const char* what = "the code bytes of";
  if (bf16_dot) {
    return bf16_dot_call(x, rows, [&](const uint16_t* xb, int64_t T, float* yp) {
      check_rows(for_checked_rows(w, simd, 16, [&](int64_t b, int64_t e) {
                   sgk::sparse_code_rows_bf16(w, xb, T, cols, bp, yp, rows, b, e);
                 }), "ext_sparse_codes_linear", what);
    });
  }
  return float32_call(x, rows, [&](const float* xp, int64_t T, float* yp) {
    check_rows(for_checked_rows(w, simd, 16, [&](int64_t b, int64_t e) {
                 sgk::sparse_code_rows(simd, w, xp, T, cols, bp, yp, rows, b, e);
               }), "ext_sparse_codes_linear", what);
  });
}

// The dense (rows, cols) weight of a quantized compressed one in `dtype`, bit for bit the values the codes stand for.
at::Tensor sparse_codes_to_dense_cpu(const at::Tensor& mask, const at::Tensor& codes, const at::Tensor& offsets,
                                     const at::Tensor& scale, const at::Tensor& zero, int64_t bits, int64_t group_size,
                                     at::ScalarType dtype, int64_t cols) {
  std::vector<at::Tensor> keep;
  const sgk::SparseCodes w = sparse_codes_view(mask, codes, offsets, scale, zero, bits, group_size, dtype, cols, 0,
                                               "ext_sparse_codes_to_dense", keep);
  at::Tensor out = empty_big({w.rows, cols}, dtype);  // from the cache of big buffers, as in sparse_to_dense_cpu
  const sgk::Simd simd = sgk::simd_used(simd_allowed());
  int64_t bad_row;
  if (dtype == at::kFloat) {
    float* dst = out.data_ptr<float>();
    bad_row = for_checked_rows(w, simd, 64,
                               [&](int64_t b, int64_t e) { sgk::sparse_code_rows_to_dense(w, dst, b, e); });
  } else {
    auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
    bad_row = for_checked_rows(w, simd, 64,
                               [&](int64_t b, int64_t e) { sgk::sparse_code_rows_to_dense(simd, w, dst, b, e); });
  }
  check_rows(bad_row, "ext_sparse_codes_to_dense", "the code bytes of");
  return out;
}

// ---- the panel kernel: many tokens (csrc/core/sparse_panel.h) ----
// Tokens a panel call transposes at once (float32 panels of x and yT of this many tokens live at the same time).
constexpr int64_t kPanelCallTokens = 1024;

// The tokens of x (T, cols) as float32 panels of up to kPanelMaxTokens tokens (P: panel i is (cols, width[i]), its
// token t at lane t - t0[i], the lanes beyond the tokens 0), and yT for their outputs ((rows, width[i]) each).
class Panels {
 public:
  // x2d: (T, cols) contiguous, float32 or bfloat16
  Panels(const at::Tensor& x2d, int64_t rows) : rows_(rows), cols_(x2d.size(1)) {
    const int64_t T = x2d.size(0);
    int64_t p = 0, y = 0;
    for (int64_t t0 = 0; t0 < T; t0 += sgk::kPanelMaxTokens) {
      const int64_t tt = std::min(sgk::kPanelMaxTokens, T - t0);
      t0_.push_back(t0);
      tokens_.push_back(tt);
      width_.push_back(sgk::panel_width(tt));
      p_off_.push_back(p);
      y_off_.push_back(y);
      p += cols_ * width_.back();
      y += rows_ * width_.back();
    }
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    P_ = at::empty({p}, f32);
    yT_ = at::empty({y}, f32);
    // transposed 64 columns at a time (one pass over x's rows per block; the block's panel rows stay in cache)
    const bool bf16 = x2d.scalar_type() == at::kBFloat16;
    const auto* xb = bf16 ? reinterpret_cast<const uint16_t*>(x2d.const_data_ptr<at::BFloat16>()) : nullptr;
    const float* xf = bf16 ? nullptr : x2d.const_data_ptr<float>();
    float* P = P_.data_ptr<float>();
    const int64_t cols = cols_;
    at::parallel_for(0, (cols + 63) / 64, 1, [&](int64_t b, int64_t e) {
      for (size_t i = 0; i < t0_.size(); ++i) {
        const int64_t S = width_[i], tt = tokens_[i];
        float* Pi = P + p_off_[i];
        for (int64_t c0 = 64 * b; c0 < std::min(cols, 64 * e); c0 += 64) {
          const int64_t c1 = std::min(cols, c0 + 64);
          for (int64_t t = 0; t < tt; ++t) {
            const int64_t row = (t0_[i] + t) * cols;
            if (bf16) {
              for (int64_t c = c0; c < c1; ++c) Pi[c * S + t] = sgk::bf16_to_float(xb[row + c]);
            } else {
              for (int64_t c = c0; c < c1; ++c) Pi[c * S + t] = xf[row + c];
            }
          }
          for (int64_t c = c0; c < c1; ++c) std::fill(Pi + c * S + tt, Pi + (c + 1) * S, 0.0f);
        }
      }
    });
  }
  size_t count() const { return t0_.size(); }
  int64_t width(size_t i) const { return width_[i]; }
  const float* P(size_t i) const { return P_.const_data_ptr<float>() + p_off_[i]; }
  float* yT(size_t i) const { return yT_.data_ptr<float>() + y_off_[i]; }
  // out (T, rows), contiguous, float32 or bfloat16 (rounded to nearest even, as Tensor.to) = the panels' outputs
  void write(at::Tensor& out) const {
    const bool bf16 = out.scalar_type() == at::kBFloat16;
    auto* ob = bf16 ? out.data_ptr<at::BFloat16>() : nullptr;
    float* of = bf16 ? nullptr : out.data_ptr<float>();
    const float* Y = yT_.const_data_ptr<float>();
    const int64_t rows = rows_;
    at::parallel_for(0, (rows + 63) / 64, 1, [&](int64_t b, int64_t e) {
      for (size_t i = 0; i < t0_.size(); ++i) {
        const int64_t S = width_[i];
        const float* Yi = Y + y_off_[i];
        for (int64_t t = 0; t < tokens_[i]; ++t) {
          const int64_t row = (t0_[i] + t) * rows;
          for (int64_t r = 64 * b; r < std::min(rows, 64 * e); ++r) {
            if (bf16) {
              ob[row + r] = c10::BFloat16(Yi[r * S + t]);
            } else {
              of[row + r] = Yi[r * S + t];
            }
          }
        }
      }
    });
  }

 private:
  int64_t rows_, cols_;
  std::vector<int64_t> t0_, tokens_, width_, p_off_, y_off_;
  at::Tensor P_, yT_;
};

// A panel call: x (..., cols) in calls of up to kPanelCallTokens tokens; run(panels) fills each panel's yT (rows
// [0, rows), bias included), which y (x's dtype, shape (..., rows)) then gets.
template <typename Run>
at::Tensor panel_call(const at::Tensor& x, int64_t rows, Run&& run) {
  const int64_t cols = x.size(-1);
  at::Tensor out = at::empty(out_shape(x, rows), x.options());
  if (out.numel() == 0) return out;
  const int64_t T = out.numel() / rows;
  const at::Tensor x2d = x.reshape({T, cols}).contiguous();
  for (int64_t t0 = 0; t0 < T; t0 += kPanelCallTokens) {
    const int64_t tt = std::min(kPanelCallTokens, T - t0);
    const Panels panels(x2d.narrow(0, t0, tt), rows);
    run(panels);
    at::Tensor part = out.view({T, rows}).narrow(0, t0, tt);
    panels.write(part);
  }
  return out;
}

// The values of rows [b, e) as float32 for the panel kernel: float32 values as they are, bfloat16 ones widened into a
// buffer of the calling thread.
thread_local std::vector<float> panel_floats;

// The panel kernel's view of a weight (rows, cols) with mask rows of ldm bytes; its values and their offsets are set
// per block of rows.
sgk::PanelRows panel_rows_of(int64_t rows, int64_t cols, const uint8_t* mask, int64_t ldm) {
  sgk::PanelRows w;
  w.rows = rows;
  w.cols = cols;
  w.mask = mask;
  w.ldm = ldm;
  return w;
}

// Rows [b, e) of every panel's yT.
void run_panels(sgk::Simd simd, const sgk::PanelRows& w, const Panels& panels, const float* bias, int64_t b,
                int64_t e) {
  for (size_t i = 0; i < panels.count(); ++i) {
    sgk::panel_rows(simd, w, panels.P(i), panels.width(i), bias, panels.yT(i), b, e);
  }
}

// y = x Wᵀ + b from a compressed weight with the panel kernel: the arguments, checks and result of ext_sparse_linear;
// for prompts (from about 16 tokens on it is faster than the row kernels, and than decompressing the weight for a
// dense product: benchmarks/RESULTS.md). Every entry of y sums its row's products in column order with fused
// multiply-adds (sgk::panel_rows_scalar), on AVX-512 in 16-lane registers, on AVX2 in 8-lane ones, elsewhere one at
// a time.
at::Tensor sparse_linear_panel_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
                                   const at::Tensor& offsets, const std::optional<at::Tensor>& bias) {
  check_sparse_linear_args(x, mask, values, offsets, bias);
  for (const at::Tensor* t : {&x, &mask, &values, &offsets}) {
    TORCH_CHECK(t->device().is_cpu(), "ext_sparse_linear_panel (CPU): every tensor must be on the CPU");
  }
  const int64_t rows = mask.size(0), cols = x.size(-1);
  const at::Tensor m = mask.contiguous(), v = values.contiguous(), off = offsets.contiguous();
  const int64_t* o = off.const_data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0 && o[rows] <= v.numel(), "ext_sparse_linear_panel: values hold ", v.numel(),
              " entries, the offsets need ", o[rows]);
  std::optional<at::Tensor> bf;
  if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
  const float* bp = bf ? bf->const_data_ptr<float>() : nullptr;
  const sgk::Simd simd = sgk::simd_used(simd_allowed());
  const bool widen = v.scalar_type() == at::kBFloat16;
  return panel_call(x, rows, [&](const Panels& panels) {
    const int64_t block = sgk::panel_block_rows(rows > 0 ? o[rows] / rows : 0, panels.width(0));
    auto run = [&](auto* vals) {
      const auto w = sparse_rows_view(m, vals, o, cols);
      return for_checked_rows(w, simd, block, [&](int64_t b, int64_t e) {
        sgk::PanelRows pr = panel_rows_of(rows, cols, m.const_data_ptr<uint8_t>(), m.size(1));
        pr.kept = o;
        if (widen) {
          const int64_t n = o[e] - o[b];
          if (static_cast<int64_t>(panel_floats.size()) < n) panel_floats.resize(static_cast<size_t>(n));
          sgk::widen_bf16(reinterpret_cast<const uint16_t*>(vals) + o[b], n, panel_floats.data());
          pr.values = panel_floats.data();
          pr.base = o[b];
        } else {
          pr.values = reinterpret_cast<const float*>(vals);
        }
        run_panels(simd, pr, panels, bp, b, e);
      });
    };
    const int64_t bad_row = widen ? run(reinterpret_cast<const uint16_t*>(v.const_data_ptr<at::BFloat16>()))
                                  : run(v.const_data_ptr<float>());
    check_rows(bad_row, "ext_sparse_linear_panel", "the number of bits set in");
  });
}

// The same from a jointly quantized weight (the arguments, checks and result of ext_sparse_codes_linear): each block
// of rows decoded to its float32 weights (sgk::decode_code_rows, bit for bit the format's), then the panel kernel.
at::Tensor sparse_codes_linear_panel_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& codes,
                                         const at::Tensor& offsets, const at::Tensor& scale, const at::Tensor& zero,
                                         int64_t bits, int64_t group_size, at::ScalarType dtype,
                                         const std::optional<at::Tensor>& bias) {
  check_codes_x(x, mask, bias);
  TORCH_CHECK(x.device().is_cpu(), "ext_sparse_codes_linear_panel (CPU): every tensor must be on the CPU");
  const int64_t cols = x.size(-1);
  std::vector<at::Tensor> keep;
  const sgk::SparseCodes w = sparse_codes_view(mask, codes, offsets, scale, zero, bits, group_size, dtype, cols,
                                               sgk::kPadCodeBytes, "ext_sparse_codes_linear_panel", keep);
  const int64_t rows = w.rows;
  std::optional<at::Tensor> bf;
  if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
  const float* bp = bf ? bf->const_data_ptr<float>() : nullptr;
  const sgk::Simd simd = sgk::simd_used(simd_allowed());
  const int64_t per_byte = bits <= 4 ? 2 : 1;
  return panel_call(x, rows, [&](const Panels& panels) {
    const int64_t block = sgk::panel_block_rows(rows > 0 ? w.offsets[rows] * per_byte / rows : 0, panels.width(0));
    const int64_t bad_row = for_checked_rows(w, simd, block, [&](int64_t b, int64_t e) {
      // at most per_byte weights per code byte, and the decoder's 8-wide stores past the last one
      const int64_t n = (w.offsets[e] - w.offsets[b]) * per_byte + 8;
      if (static_cast<int64_t>(panel_floats.size()) < n) panel_floats.resize(static_cast<size_t>(n));
      int64_t kept[sgk::kPanelMaxRows + 1];
      sgk::decode_code_rows(simd, w, b, e, panel_floats.data(), kept);
      sgk::PanelRows pr = panel_rows_of(rows, cols, w.mask, w.ldm);
      pr.kept = kept;
      pr.first = b;
      pr.values = panel_floats.data();
      run_panels(simd, pr, panels, bp, b, e);
    });
    check_rows(bad_row, "ext_sparse_codes_linear_panel", "the code bytes of");
  });
}

at::Tensor sparse_codes_linear_meta(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& codes,
                                    const at::Tensor& offsets, const at::Tensor& scale, const at::Tensor& zero,
                                    int64_t bits, int64_t group_size, at::ScalarType dtype,
                                    const std::optional<at::Tensor>& bias) {
  check_codes_x(x, mask, bias);
  rounding_of(dtype, "ext_sparse_codes_linear");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = mask.size(0);
  return at::empty(shape, x.options());
}

at::Tensor sparse_codes_to_dense_meta(const at::Tensor& mask, const at::Tensor& codes, const at::Tensor& offsets,
                                      const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                                      int64_t group_size, at::ScalarType dtype, int64_t cols) {
  rounding_of(dtype, "ext_sparse_codes_to_dense");
  return at::empty({mask.size(0), cols}, mask.options().dtype(dtype));
}

at::Tensor sparse_to_dense_meta(const at::Tensor& mask, const at::Tensor& values, const at::Tensor& offsets,
                                int64_t cols) {
  return at::empty({mask.size(0), cols}, values.options());
}

at::Tensor sparse_linear_meta(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
                              const at::Tensor& offsets, const std::optional<at::Tensor>& bias) {
  check_sparse_linear_args(x, mask, values, offsets, bias);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = mask.size(0);
  return at::empty(shape, x.options());
}

// ---- shape-only implementations ----
std::tuple<at::Tensor, at::Tensor> inverse_factor_meta(const at::Tensor& H, double damp) {
  sgk_aten::check_factor_args(H, damp, "ext_inverse_factor");
  return {at::empty_like(H, at::MemoryFormat::Contiguous), at::empty({}, H.options().dtype(at::kInt))};
}

std::tuple<at::Tensor, at::Tensor> cholesky_factor_meta(const at::Tensor& H, double damp) {
  sgk_aten::check_factor_args(H, damp, "ext_cholesky_factor");
  return {at::empty_like(H, at::MemoryFormat::Contiguous), at::empty({}, H.options().dtype(at::kInt))};
}

at::Tensor nm_keep_mask_meta(const at::Tensor& scores, int64_t n, int64_t m) {
  sgk_aten::check_nm_args(scores, n, m);
  return at::empty(scores.sizes(), scores.options().dtype(at::kBool));
}

at::Tensor unstructured_keep_mask_meta(const at::Tensor& scores, double sparsity, int64_t block_size) {
  sgk_aten::check_unstructured_mask_args(scores, sparsity, block_size);
  return at::empty(scores.sizes(), scores.options().dtype(at::kBool));
}

at::Tensor sweep_meta(const at::Tensor& W, const at::Tensor& U, double sparsity, int64_t n, int64_t m,
                      int64_t block_size, const std::optional<at::Tensor>& scale,
                      const std::optional<at::Tensor>& zero, int64_t maxq, int64_t group_size) {
  sgk_aten::check_sweep_args(W, U, sparsity, n, m, block_size, scale, zero, maxq, group_size, "ext_sweep");
  return at::empty({}, W.options());
}

at::Tensor sweep_cholesky_meta(const at::Tensor& W, const at::Tensor& R, double sparsity, int64_t n, int64_t m,
                               int64_t block_size, const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& zero, int64_t maxq, int64_t group_size) {
  sgk_aten::check_sweep_args(W, R, sparsity, n, m, block_size, scale, zero, maxq, group_size, "ext_sweep_cholesky");
  return at::empty({}, W.options());
}

}  // namespace

// A fragment: other parts of the package define further operators in the same namespace from Python.
TORCH_LIBRARY_FRAGMENT(sparsegpt_kernels, m) {
  m.def("ext_inverse_factor(Tensor H, float damp) -> (Tensor, Tensor)");
  m.def("ext_nm_keep_mask(Tensor scores, int n, int m) -> Tensor");
  // the refinement's unstructured projection: per block of columns over all rows, the lowest scores pruned
  m.def("ext_unstructured_keep_mask(Tensor scores, float sparsity, int block_size) -> Tensor");
  m.def(
      "ext_sweep(Tensor(a!) W, Tensor U, float sparsity, int n, int m, int block_size, Tensor? scale, "
      "Tensor? zero, int maxq, int group_size) -> Tensor");
  m.def("ext_cholesky_factor(Tensor H, float damp) -> (Tensor, Tensor)");
  m.def(
      "ext_sweep_cholesky(Tensor(a!) W, Tensor R, float sparsity, int n, int m, int block_size, Tensor? scale, "
      "Tensor? zero, int maxq, int group_size) -> Tensor");
  // seconds per phase of the last CPU sweep in this process: block start, unstructured selection, in-block steps,
  // lazy update (csrc/core/sweep_core.h, sgk::Phase); for benchmarks
  m.def("ext_last_sweep_phases() -> float[]", &last_sweep_phases);
  // the instruction set the CPU sweep's in-block steps run with here: "avx512", "avx2" or "baseline" (see
  // SPARSEGPT_KERNELS_CPU_SIMD)
  m.def("ext_cpu_simd() -> str", &cpu_simd);
  // prune_layer's value checks in one pass each: [min, max, max |H - H^T|, finite] and [non-zeros, finite]
  m.def("ext_hessian_stats(Tensor H) -> float[]");
  m.def("ext_nonzeros_finite(Tensor t) -> int[]");
  // prune_layer's working copy of W on huge pages (csrc/core/big_buffer.h)
  m.def("ext_empty_big(int[] size, ScalarType dtype) -> Tensor", &empty_big);
  // the big CPU buffers kept idle for reuse (csrc/core/big_buffer.h, BigCache): free them / how many bytes they hold
  m.def("ext_release_cpu_cache() -> int", &release_cpu_cache);
  m.def("ext_cpu_cache_idle_bytes() -> int", &cpu_cache_idle_bytes);
  // y = x W^T + b from a compressed weight (sparsegpt_kernels.SparseLinear; docs/sparse_format.md)
  m.def("ext_sparse_linear(Tensor x, Tensor mask, Tensor values, Tensor offsets, Tensor? bias) -> Tensor");
  m.def("ext_sparse_to_dense(Tensor mask, Tensor values, Tensor offsets, int cols) -> Tensor");
  // the same from jointly quantized weights: grid codes, per-group scales and zero points (csrc/core/sparse_codes.h)
  m.def(
      "ext_sparse_codes_linear(Tensor x, Tensor mask, Tensor codes, Tensor offsets, Tensor scale, Tensor zero, "
      "int bits, int group_size, ScalarType dtype, Tensor? bias) -> Tensor");
  m.def(
      "ext_sparse_codes_to_dense(Tensor mask, Tensor codes, Tensor offsets, Tensor scale, Tensor zero, int bits, "
      "int group_size, ScalarType dtype, int cols) -> Tensor");
  // the same for many tokens (prompts), by the panel kernel (csrc/core/sparse_panel.h)
  m.def("ext_sparse_linear_panel(Tensor x, Tensor mask, Tensor values, Tensor offsets, Tensor? bias) -> Tensor");
  m.def(
      "ext_sparse_codes_linear_panel(Tensor x, Tensor mask, Tensor codes, Tensor offsets, Tensor scale, Tensor zero, "
      "int bits, int group_size, ScalarType dtype, Tensor? bias) -> Tensor");
  m.def("ext_cpu_has_panel() -> bool", &panel_simd);
  m.def("ext_cpu_has_bf16_dot() -> bool", &bf16_dot_simd);
}

TORCH_LIBRARY_IMPL(sparsegpt_kernels, CPU, m) {
  m.impl("ext_inverse_factor", &sgk_aten::inverse_factor);
  m.impl("ext_nm_keep_mask", &nm_keep_mask_cpu);
  m.impl("ext_unstructured_keep_mask", &unstructured_keep_mask_cpu);
  m.impl("ext_sweep", &sweep_cpu);
  m.impl("ext_cholesky_factor", &cholesky_factor_cpu);
  m.impl("ext_sweep_cholesky", &sweep_cholesky_cpu);
  m.impl("ext_hessian_stats", &hessian_stats_cpu);
  m.impl("ext_nonzeros_finite", &nonzeros_finite_cpu);
  m.impl("ext_sparse_linear", &sparse_linear_cpu);
  m.impl("ext_sparse_to_dense", &sparse_to_dense_cpu);
  m.impl("ext_sparse_codes_linear", &sparse_codes_linear_cpu);
  m.impl("ext_sparse_codes_to_dense", &sparse_codes_to_dense_cpu);
  m.impl("ext_sparse_linear_panel", &sparse_linear_panel_cpu);
  m.impl("ext_sparse_codes_linear_panel", &sparse_codes_linear_panel_cpu);
}

TORCH_LIBRARY_IMPL(sparsegpt_kernels, Meta, m) {
  m.impl("ext_inverse_factor", &inverse_factor_meta);
  m.impl("ext_nm_keep_mask", &nm_keep_mask_meta);
  m.impl("ext_unstructured_keep_mask", &unstructured_keep_mask_meta);
  m.impl("ext_sweep", &sweep_meta);
  m.impl("ext_cholesky_factor", &cholesky_factor_meta);
  m.impl("ext_sweep_cholesky", &sweep_cholesky_meta);
  m.impl("ext_sparse_linear", &sparse_linear_meta);
  m.impl("ext_sparse_to_dense", &sparse_to_dense_meta);
  m.impl("ext_sparse_codes_linear", &sparse_codes_linear_meta);
  m.impl("ext_sparse_codes_to_dense", &sparse_codes_to_dense_meta);
  m.impl("ext_sparse_linear_panel", &sparse_linear_meta);
  m.impl("ext_sparse_codes_linear_panel", &sparse_codes_linear_meta);
}
