// CUDA kernels: the fused block sweep (a warp per row, the row's block in registers) and N:M mask selection.
// Torch-free: compiled by plain nvcc (CMake compile check) and by the torch extension build alike.
#include <cstdint>

#include "../core/rules.h"
#include "sweep_kernels.h"

namespace sgk_cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarpsPerBlock = 4;

// products rounded before the subtraction (no contraction into an FMA), like the reference
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// scale * (clamp(round_half_even(w / scale) + zero, 0, maxq) - zero)
template <typename T>
__device__ __forceinline__ T quantize(T w, T scale, T zero, T maxq) {
  T q = rint(w / scale) + zero;
  q = fmin(fmax(q, T(0)), maxq);
  return scale * (q - zero);
}

template <typename T>
__device__ __forceinline__ T score(T w, T d) {
  return mul_rn(w, w) / mul_rn(d, d);
}

template <int VPT, typename V>
__device__ __forceinline__ V slot(const V (&v)[VPT], int t) {
  V out = v[0];
#pragma unroll
  for (int i = 1; i < VPT; ++i)
    if (i == t) out = v[i];
  return out;
}

template <typename T, int VPT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) sweep_block_kernel(BlockArgs<T> a) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= a.rows) return;  // the whole warp leaves together
  const int B = static_cast<int>(a.i2 - a.i1);
  const bool nm = a.m > 0;
  const bool quant = a.scale != nullptr;
  T* Wr = a.W + row * a.ldw + a.i1;
  const T* U1 = a.U + a.i1 * a.ldu + a.i1;  // U[i1:i2, i1:i2], row-major with ld ldu

  T w[VPT];
  unsigned pruned_bits = 0;  // bit t: column lane + 32 t of the block is pruned
#pragma unroll
  for (int t = 0; t < VPT; ++t) {
    const int k = lane + 32 * t;
    w[t] = k < B ? Wr[k] : T(0);
    if (!nm && k < B && a.pruned[row * B + k]) pruned_bits |= 1u << t;
  }

  T loss = 0;
  for (int j = 0; j < B; ++j) {
    const int jl = j & 31, jt = j >> 5;
    if (nm && j % a.m == 0) {
      // score the group [j, j + m) with the current weights; prune the m - n lowest (earlier first on ties)
      T s[VPT];
      int rank[VPT];
#pragma unroll
      for (int t = 0; t < VPT; ++t) {
        const int k = lane + 32 * t;
        const bool in = k >= j && k < j + a.m;
        s[t] = in ? score(w[t], U1[k * a.ldu + k]) : T(0);
        rank[t] = 0;
      }
      for (int c = j; c < j + a.m; ++c) {
        const T sc = __shfl_sync(kFull, slot<VPT>(s, c >> 5), c & 31);
#pragma unroll
        for (int t = 0; t < VPT; ++t) {
          const int k = lane + 32 * t;
          rank[t] += (sc < s[t]) || (sc == s[t] && c < k);
        }
      }
#pragma unroll
      for (int t = 0; t < VPT; ++t) {
        const int k = lane + 32 * t;
        if (k >= j && k < j + a.m) {
          if (rank[t] < a.m - a.n)
            pruned_bits |= 1u << t;
          else
            pruned_bits &= ~(1u << t);
        }
      }
    }
    const T wj = __shfl_sync(kFull, slot<VPT>(w, jt), jl);
    const bool prune = (__shfl_sync(kFull, pruned_bits, jl) >> jt) & 1u;
    const T* urow = U1 + static_cast<int64_t>(j) * a.ldu;
    const T dj = urow[j];
    T q = prune ? T(0) : wj;
    if (quant) {
      const int64_t g = (a.i1 + j) / a.group_size;
      q = quantize(q, a.scale[row * a.ldq + g], a.zero[row * a.ldq + g], static_cast<T>(a.maxq));
    }
    const T err = (wj - q) / dj;
    loss += mul_rn(err, err);
    if (lane == jl) {
      a.E[row * B + j] = err;
    }
#pragma unroll
    for (int t = 0; t < VPT; ++t) {
      const int k = lane + 32 * t;
      if (k == j) w[t] = q;
      if (k > j && k < B) w[t] = w[t] - mul_rn(err, urow[k]);
    }
  }
#pragma unroll
  for (int t = 0; t < VPT; ++t) {
    const int k = lane + 32 * t;
    if (k < B) Wr[k] = w[t];
  }
  if (lane == 0) a.row_loss[row] += loss;
}

template <typename T>
__global__ void nm_keep_mask_kernel(const T* scores, int64_t groups, int n, int m, uint8_t* keep) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const T* s = scores + g * m;
  uint8_t* out = keep + g * m;
  for (int i = 0; i < m; ++i) {
    const T si = s[i];
    int rank = 0;
    for (int k = 0; k < m; ++k) rank += (s[k] < si) || (s[k] == si && k < i);
    out[i] = rank < m - n ? 0 : 1;
  }
}

template <typename T, int VPT>
cudaError_t launch_vpt(const BlockArgs<T>& a, cudaStream_t stream) {
  const int64_t blocks = (a.rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  sweep_block_kernel<T, VPT><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

// The widest instantiation (VPT = 32 values per lane, a warp of 32 lanes) holds exactly the widest block of the rule.
static_assert(kMaxBlock == 32 * 32, "launch_sweep_block's largest VPT must match sgk::kCudaMaxBlock");

template <typename T>
cudaError_t launch_sweep_block(const BlockArgs<T>& a, cudaStream_t stream) {
  const int64_t B = a.i2 - a.i1;
  if (a.rows <= 0 || B <= 0) return cudaSuccess;
  if (B > kMaxBlock || a.rows > (int64_t{1} << 36)) return cudaErrorInvalidValue;
  // the rules of csrc/core/rules.h once more: register_cuda.cpp checks them first, but the launchers are a torch-free
  // interface of their own (a bad N:M or maxq would index past a group or quantize onto the wrong grid)
  if (a.m != 0 && !sgk::valid_nm(a.n, a.m)) return cudaErrorInvalidValue;
  if (a.scale != nullptr && !sgk::valid_maxq(a.maxq)) return cudaErrorInvalidValue;
  if (B <= 32) return launch_vpt<T, 1>(a, stream);
  if (B <= 64) return launch_vpt<T, 2>(a, stream);
  if (B <= 128) return launch_vpt<T, 4>(a, stream);
  if (B <= 256) return launch_vpt<T, 8>(a, stream);
  if (B <= 512) return launch_vpt<T, 16>(a, stream);
  return launch_vpt<T, 32>(a, stream);
}

template <typename T>
cudaError_t launch_nm_keep_mask(const T* scores, int64_t rows, int64_t cols, int n, int m, uint8_t* keep,
                                cudaStream_t stream) {
  if (!sgk::valid_nm(n, m)) return cudaErrorInvalidValue;
  const int64_t groups = rows * (cols / m);
  if (groups == 0) return cudaSuccess;
  constexpr int threads = 256;
  const int64_t blocks = (groups + threads - 1) / threads;
  nm_keep_mask_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(scores, groups, n, m, keep);
  return cudaGetLastError();
}

template cudaError_t launch_sweep_block<float>(const BlockArgs<float>&, cudaStream_t);
template cudaError_t launch_sweep_block<double>(const BlockArgs<double>&, cudaStream_t);
template cudaError_t launch_nm_keep_mask<float>(const float*, int64_t, int64_t, int, int, uint8_t*, cudaStream_t);
template cudaError_t launch_nm_keep_mask<double>(const double*, int64_t, int64_t, int, int, uint8_t*, cudaStream_t);

}  // namespace sgk_cuda
