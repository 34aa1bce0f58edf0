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
#include <cstdlib>
#include <functional>
#include <mutex>
#include <string>
#include <optional>
#include <tuple>
#include <vector>

#include "../core/sweep_core.h"
#include "aten_ops.h"

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

// Columns per diagonal block of the blocked factorisation, and columns per GEMM of its trailing updates (measured on
// 2 cores at 4096 and 11008 columns: 1.8x LAPACK's potrf at 4096, 1.15x at 11008, the GEMMs at about 300 GFLOP/s).
constexpr int64_t kFactorBlock = 256;
constexpr int64_t kFactorPanel = 512;

// In place on the row-major (c, c) matrix A: its upper triangle becomes R, upper triangular with A = R R^T (the
// reversed Cholesky factor; the strict lower triangle is left holding junk). Blocked from the bottom-right corner:
// for the last block D of what is left, R_D = J chol(J D J) J (LAPACK on a (b, b) copy); the block column above it
// is R_12 = A_12 R_D^-T (a GEMM with the explicit inverse of the small triangle); then A_11 -= R_12 R_12^T on the
// upper triangle, in column panels. Returns 0, or the 1-based column of the first failing pivot.
int64_t upper_lower_cholesky(at::Tensor& A) {
  const int64_t c = A.size(0);
  for (int64_t k1 = c; k1 > 0; k1 -= kFactorBlock) {
    const int64_t k0 = std::max<int64_t>(0, k1 - kFactorBlock), b = k1 - k0;
    at::Tensor D = A.slice(0, k0, k1).slice(1, k0, k1);
    auto [L, info] = at::linalg_cholesky_ex(D.flip({0, 1}), /*upper=*/false);
    const int64_t bad = info.item<int64_t>();
    if (bad != 0) return k1 - bad + 1;  // reversed order: the failing pivot counted from the block's end
    const at::Tensor Rd = L.flip({0, 1});  // upper triangular, zeros below the diagonal
    D.copy_(Rd);
    if (k0 == 0) break;
    at::Tensor P = A.slice(0, 0, k0).slice(1, k0, k1);  // (k0, b): A_12, becomes R_12
    const at::Tensor Ri = at::linalg_solve_triangular(Rd, at::eye(b, A.options()), /*upper=*/true);
    P.copy_(at::mm(P, Ri.t()));
    for (int64_t j0 = 0; j0 < k0; j0 += kFactorPanel) {
      const int64_t j1 = std::min(k0, j0 + kFactorPanel);
      at::Tensor C = A.slice(0, 0, j1).slice(1, j0, j1);  // rows above the panel's bottom: its upper part
      C.addmm_(P.slice(0, 0, j1), P.slice(0, j0, j1).t(), /*beta=*/1, /*alpha=*/-1);
    }
  }
  return 0;
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
  at::Tensor R = at::empty({c, c}, H.options());
  if (c == 0) return {R, at::zeros({}, H.options().dtype(at::kInt))};
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

// SPARSEGPT_KERNELS_CPU_SIMD=baseline: the in-block steps without AVX2 even where the CPU has it (for tests and
// comparisons; the results are the same)
bool wide_simd_allowed() {
  const char* simd = std::getenv("SPARSEGPT_KERNELS_CPU_SIMD");
  return simd == nullptr || std::string(simd) != "baseline";
}

bool cpu_wide_simd() { return sgk::uses_avx2_tiles(wide_simd_allowed()); }

// The sweep on either factor (see sgk::Factor). kCholesky keeps its lazy updates in a scratch buffer of W's shape.
at::Tensor sweep_cpu_impl(const at::Tensor& W, const at::Tensor& G, double sparsity, int64_t n, int64_t m,
                          int64_t block_size, const std::optional<at::Tensor>& scale,
                          const std::optional<at::Tensor>& zero, int64_t maxq, int64_t group_size,
                          sgk::Factor factor, const char* name) {
  sgk_aten::check_sweep_args(W, G, sparsity, n, m, block_size, scale, zero, maxq, group_size);
  TORCH_CHECK(W.device().is_cpu(), name, " (CPU): W must be a CPU tensor");
  const at::Tensor Gc = G.contiguous();
  const at::Tensor sc = scale.has_value() ? scale->contiguous() : at::Tensor();
  const at::Tensor zc = zero.has_value() ? zero->contiguous() : at::Tensor();
  const int64_t rows = W.size(0), cols = W.size(1);
  const bool chol = factor == sgk::Factor::kCholesky;
  const at::Tensor A = chol && cols > block_size ? at::empty({rows, cols}, W.options()) : at::Tensor();
  double loss = 0.0;
  std::array<double, sgk::kNumPhases> phases{};
  const bool wide_simd = wide_simd_allowed();
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "ext_sweep", [&] {
    sgk::SweepParams<scalar_t> p;
    p.rows = rows;
    p.cols = cols;
    p.W = W.mutable_data_ptr<scalar_t>();
    p.ldw = cols;
    p.G = Gc.const_data_ptr<scalar_t>();
    p.ldg = cols;
    p.factor = factor;
    if (A.defined()) {
      p.A = A.mutable_data_ptr<scalar_t>();
      p.lda = cols;
    }
    p.sparsity = sparsity;
    p.n = n;
    p.m = m;
    p.block_size = block_size;
    p.phase_seconds = phases.data();
    p.wide_simd = wide_simd;
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
    // C (m, n) = beta * C + op(A) @ B on row-major buffers, through ATen's BLAS (no copies: strided views)
    auto gemm = [&](int64_t mm, int64_t nn, int64_t kk, const scalar_t* a, int64_t lda, bool a_trans,
                    const scalar_t* b, int64_t ldb, scalar_t* c, int64_t ldc, int beta) {
      const at::TensorOptions o = W.options();
      const at::Tensor At = a_trans ? at::from_blob(const_cast<scalar_t*>(a), {kk, mm}, {lda, 1}, o).t()
                                    : at::from_blob(const_cast<scalar_t*>(a), {mm, kk}, {lda, 1}, o);
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

at::Tensor sweep_meta(const at::Tensor& W, const at::Tensor& U, double sparsity, int64_t n, int64_t m,
                      int64_t block_size, const std::optional<at::Tensor>& scale,
                      const std::optional<at::Tensor>& zero, int64_t maxq, int64_t group_size) {
  sgk_aten::check_sweep_args(W, U, sparsity, n, m, block_size, scale, zero, maxq, group_size);
  return at::empty({}, W.options());
}

}  // namespace

// A fragment: other parts of the package define further operators in the same namespace from Python.
TORCH_LIBRARY_FRAGMENT(sparsegpt_kernels, m) {
  m.def("ext_inverse_factor(Tensor H, float damp) -> (Tensor, Tensor)");
  m.def("ext_nm_keep_mask(Tensor scores, int n, int m) -> Tensor");
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
  // whether the CPU sweep's in-block steps run the AVX2 copy here (see SPARSEGPT_KERNELS_CPU_SIMD)
  m.def("ext_cpu_wide_simd() -> bool", &cpu_wide_simd);
}

TORCH_LIBRARY_IMPL(sparsegpt_kernels, CPU, m) {
  m.impl("ext_inverse_factor", &sgk_aten::inverse_factor);
  m.impl("ext_nm_keep_mask", &nm_keep_mask_cpu);
  m.impl("ext_sweep", &sweep_cpu);
  m.impl("ext_cholesky_factor", &cholesky_factor_cpu);
  m.impl("ext_sweep_cholesky", &sweep_cholesky_cpu);
}

TORCH_LIBRARY_IMPL(sparsegpt_kernels, Meta, m) {
  m.impl("ext_inverse_factor", &inverse_factor_meta);
  m.impl("ext_nm_keep_mask", &nm_keep_mask_meta);
  m.impl("ext_sweep", &sweep_meta);
  m.impl("ext_cholesky_factor", &cholesky_factor_meta);
  m.impl("ext_sweep_cholesky", &sweep_meta);
}
