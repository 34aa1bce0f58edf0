// y = x Wᵀ (+ b) straight from a compressed weight (docs/sparse_format.md): a bitmask of the kept weights and their
// values in row-major order. Torch-free; the ATen operator ext_sparse_linear (csrc/cpu/ops.cpp) calls it.
//
// Layout read here: mask (rows, ldm) uint8, bit j % 8 of byte j / 8 of row r set when W[r, j] is kept; values
// (float32, or bfloat16 as its 16 raw bits), row r's first value at offsets[r]. x: (T, cols) float32, leading
// dimension ldx. y: (T, rows) float32, leading dimension ldy.
//
// Each row is one dot product per token, summed in the order of its kept columns in chunks of the vector width: the
// chunk's kept values are expanded into their columns and multiplied with the dense x. The expansion, by value type:
// bfloat16 (AVX2, and AVX-512 machines too, where it measured faster than vexpandps): one byte shuffle from a
// 256-entry table indexed by the mask byte turns the chunk's 8 raw values into 8 float32 lanes, the unkept ones 0;
// float32: AVX-512 vexpandps, AVX2 the values beyond the chunk's count zeroed, then a permutation from a table.
// Rows are independent, so callers split them between threads. The SIMD copies read up to one vector of values
// beyond a row's last one (never beyond the buffer when it holds kPadValues more values than the mask keeps) and load
// only whole chunks of x (the columns of a partial last chunk are done one by one).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "sweep_core.h"  // Simd, cpu_simd, simd_used

namespace sgk {

// Values a buffer must hold beyond the mask's count for the SIMD copies' whole-vector reads.
constexpr int64_t kPadValues = 16;

template <typename V>
struct SparseRows {
  int64_t rows = 0, cols = 0;
  const uint8_t* mask = nullptr;
  int64_t ldm = 0;  // bytes per mask row: (cols + 7) / 8
  const V* values = nullptr;
  const int64_t* offsets = nullptr;  // (rows + 1): row r's values are [offsets[r], offsets[r + 1])
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// Bits set in the `n` bytes at p, 8 bytes a step.
inline int64_t count_bits_portable(const uint8_t* p, int64_t n) {
  int64_t c = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t u;
    std::memcpy(&u, p + i, sizeof u);
    c += __builtin_popcountll(u);
  }
  for (; i < n; ++i) c += __builtin_popcount(p[i]);
  return c;
}

inline float value_of(float v) { return v; }
inline float value_of(uint16_t v) { return bf16_to_float(v); }

// Rows [r0, r1) for T tokens, one kept weight at a time: the specification of the SIMD copies (and their path for the
// columns of a partial last chunk).
template <typename V>
void sparse_rows_scalar(const SparseRows<V>& w, const float* x, int64_t T, int64_t ldx, const float* bias, float* y,
                        int64_t ldy, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * ldx;
      const uint8_t* m = w.mask + r * w.ldm;
      const V* v = w.values + w.offsets[r];
      float acc = 0.0f;
      for (int64_t j = 0; j < w.cols; ++j) {
        if ((m[j >> 3] >> (j & 7)) & 1) acc += value_of(*v++) * xt[j];
      }
      y[t * ldy + r] = bias != nullptr ? acc + bias[r] : acc;
    }
  }
}

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define SGK_HAVE_SPARSE_SIMD 1
}  // namespace sgk
#include <immintrin.h>
namespace sgk {
// GCC 12's AVX-512 intrinsics pass _mm512_undefined_epi32() as the unused merge source of their unmasked forms,
// which -Wall reports as uninitialised at every inlined call: silenced here, for these functions only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// For a mask byte m: lane i of index[m] is the position among the kept values of the value of lane i (the number
// of kept lanes below it), and 7 for a lane that is not kept; tail[k] keeps the first k lanes (all bits set) and
// zeroes the others. With the loaded values masked by tail[popcount(m)], lane 7 is 0 whenever a lane is not kept
// (then at most 7 are), so one permutation both places the kept values and zeroes the rest (float32 values).
// words[m] places 8 bfloat16 values as 16-bit words (word i of a kept lane i is value k, the others 0), for the
// bfloat16 dot products of sparse_rows_bf16.
// shuffle[m] does the same for 8 bfloat16 values in one byte shuffle: with the 16 bytes of the chunk's values in
// both 128-bit halves of a register, bytes 4i+2 and 4i+3 of a kept lane i take value k's two bytes (2k, 2k+1), so
// lane i becomes the float32 whose high half is that bfloat16; every other byte has its top bit set, which the
// shuffle turns into 0.
struct ExpandTable {
  alignas(32) int32_t index[256][8];
  alignas(32) int32_t tail[9][8];
  alignas(32) uint8_t shuffle[256][32];
  alignas(16) uint8_t words[256][16];
  ExpandTable() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int i = 0; i < 8; ++i) {
        const bool kept = (m >> i) & 1;
        index[m][i] = kept ? k : 7;
        shuffle[m][4 * i] = shuffle[m][4 * i + 1] = 0x80;
        shuffle[m][4 * i + 2] = kept ? static_cast<uint8_t>(2 * k) : 0x80;
        shuffle[m][4 * i + 3] = kept ? static_cast<uint8_t>(2 * k + 1) : 0x80;
        words[m][2 * i] = kept ? static_cast<uint8_t>(2 * k) : 0x80;
        words[m][2 * i + 1] = kept ? static_cast<uint8_t>(2 * k + 1) : 0x80;
        k += kept;
      }
    }
    for (int k = 0; k <= 8; ++k) {
      for (int i = 0; i < 8; ++i) tail[k][i] = i < k ? -1 : 0;
    }
  }
};

inline const ExpandTable& expand_table() {
  static const ExpandTable table;
  return table;
}

// The 8 columns of one chunk of a row with mask byte `bits` and `count` = popcount(bits) kept values starting at v
// (AVX2): the values expanded into their lanes, the others 0.
template <typename V>
__attribute__((target("avx2,fma,popcnt"))) inline __m256 expand8(const V* v, int bits, int count,
                                                                  const ExpandTable& tab) {
  if constexpr (sizeof(V) == 4) {
    __m256i vals = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
    vals = _mm256_and_si256(vals, _mm256_load_si256(reinterpret_cast<const __m256i*>(tab.tail[count])));
    const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(tab.index[bits]));
    return _mm256_permutevar8x32_ps(_mm256_castsi256_ps(vals), idx);
  } else {
    (void)count;
    const __m256i vals = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
    const __m256i ctl = _mm256_load_si256(reinterpret_cast<const __m256i*>(tab.shuffle[bits]));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(vals, ctl));
  }
}

// The sum of token t's U accumulators of 8 lanes, in a fixed order (the code kernel of sparse_codes.h sums the same
// way, so that the two agree bit for bit).
template <int U, int TB>
__attribute__((target("avx2"))) inline float sum_accumulators(const __m256 (&acc)[U][TB], int t) {
  __m256 a = acc[0][t];
  for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[u][t]);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

// Up to 4 tokens of one row, 8 columns a chunk (AVX2 + FMA), from chunk c on with the accumulators acc and the row's
// values from v on (sparse_row_avx2 starts at chunk 0; sparse_row_vbmi hands over its sums after its 64-column
// steps). U chunks a step, each with its own accumulators: the chunks' value pointers are the only chain between
// them (one popcount and one add), and U independent FMA chains hide the FMA latency.
template <typename V, int TB, int U>
__attribute__((target("avx2,fma,popcnt"))) inline void finish_row_avx2(const SparseRows<V>& w, const float* x,
                                                                        int64_t ldx, const uint8_t* m, const V* v,
                                                                        int64_t c, __m256 (&acc)[U][TB],
                                                                        float* out) {
  const ExpandTable& tab = expand_table();
  const int64_t full = w.cols / 8;
  for (; c + U <= full; c += U) {
    const V* vu[U];
    int bits[U], count[U];
    for (int u = 0; u < U; ++u) {
      bits[u] = m[c + u];
      count[u] = _mm_popcnt_u32(static_cast<unsigned>(bits[u]));
      vu[u] = v;
      v += count[u];
    }
    for (int u = 0; u < U; ++u) {
      const __m256 wv = expand8(vu[u], bits[u], count[u], tab);
      const float* xc = x + (c + u) * 8;
      for (int t = 0; t < TB; ++t) acc[u][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xc + t * ldx), acc[u][t]);
    }
  }
  for (; c < full; ++c) {
    const int bits = m[c];
    const int count = _mm_popcnt_u32(static_cast<unsigned>(bits));
    const __m256 wv = expand8(v, bits, count, tab);
    v += count;
    for (int t = 0; t < TB; ++t) acc[0][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * ldx + c * 8), acc[0][t]);
  }
  for (int t = 0; t < TB; ++t) out[t] = sum_accumulators<U>(acc, t);
  for (int64_t j = full * 8; j < w.cols; ++j) {  // a partial last chunk
    if ((m[j >> 3] >> (j & 7)) & 1) {
      const float wj = value_of(*v++);
      for (int t = 0; t < TB; ++t) out[t] += wj * x[t * ldx + j];
    }
  }
}

template <typename V, int TB>
__attribute__((target("avx2,fma,popcnt"))) inline void sparse_row_avx2(const SparseRows<V>& w, const float* x,
                                                                        int64_t ldx, int64_t r, float* out) {
  constexpr int U = TB == 1 ? 4 : 2;
  __m256 acc[U][TB];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < TB; ++t) acc[u][t] = _mm256_setzero_ps();
  finish_row_avx2<V, TB, U>(w, x, ldx, w.mask + r * w.ldm, w.values + w.offsets[r], 0, acc, out);
}

// What the 64-column steps of the VBMI copies (sparse_row_vbmi here, sparse_code_row_vbmi in sparse_codes.h) use:
// AVX-512F/BW/VL/DQ with VBMI (byte permutations) and BITALG (byte popcounts), BMI2.
#define SGK_VBMI_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bitalg,avx2,fma,f16c,popcnt,bmi2"

inline bool cpu_has_vbmi() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bitalg") &&
                          __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c");
  return has;
}

// Byte constants of the 64-column steps: byte 8i + j of bcast is i (byte i of a qword broadcast to the 8 bytes of
// lane i), of seq j, of below (1 << j) - 1 (the bits of a mask byte below lane j).
struct VbmiConsts {
  alignas(64) uint8_t bcast[64];
  alignas(64) uint8_t seq[64];
  alignas(64) uint8_t below[64];
  VbmiConsts() {
    for (int b = 0; b < 64; ++b) {
      bcast[b] = static_cast<uint8_t>(b / 8);
      seq[b] = static_cast<uint8_t>(b % 8);
      below[b] = static_cast<uint8_t>((1u << (b % 8)) - 1u);
    }
  }
};

inline const VbmiConsts& vbmi_consts() {
  static const VbmiConsts c;
  return c;
}

// The ranks of a 64-column step with mask bits q (8 chunks of 8 columns): byte 8i + j holds the number of kept
// columns of chunk i below column j (the column's position among its chunk's kept ones), and *starts byte i the
// number kept in chunks 0..i-1 (each at most 56); one byte popcount of the 8 mask bytes and one multiplication.
__attribute__((target(SGK_VBMI_TARGET))) inline __m512i step_ranks(uint64_t q, const VbmiConsts& vc,
                                                                  uint64_t* starts) {
  const __m128i qv = _mm_cvtsi64_si128(static_cast<long long>(q));
  const auto counts = static_cast<uint64_t>(_mm_cvtsi128_si64(_mm_popcnt_epi8(qv)));
  *starts = (counts * 0x0101010101010101ull) << 8;
  const __m512i mb = _mm512_permutexvar_epi8(_mm512_load_si512(vc.bcast), _mm512_castsi128_si512(qv));
  return _mm512_popcnt_epi8(_mm512_and_si512(mb, _mm512_load_si512(vc.below)));
}

// The 8 bytes of u broadcast each to its lane's 8 bytes (byte 8i + j = byte i of u).
__attribute__((target(SGK_VBMI_TARGET))) inline __m512i bytes_to_lanes(uint64_t u, const VbmiConsts& vc) {
  return _mm512_permutexvar_epi8(_mm512_load_si512(vc.bcast),
                                 _mm512_castsi128_si512(_mm_cvtsi64_si128(static_cast<long long>(u))));
}

// The four 16-column quarters of a 64-column step: weights(integral_constant<int, QD>) gives quarter QD's 16
// weights; each is multiplied with the TB tokens' x from xs on and added to A (quarters 0 and 2) or B (1 and 3) when
// U = 4, to A when U = 2: the accumulators of the 8-lane copies (U chunks of 8 columns each), two to a register.
template <int TB, int U, typename Weights>
__attribute__((target(SGK_VBMI_TARGET))) inline void vbmi_step_fma(Weights&& weights, const float* xs, int64_t ldx,
                                                                  __m512 (&A)[TB], __m512 (&B)[TB]) {
  auto quarter = [&](auto qd) __attribute__((target(SGK_VBMI_TARGET))) {
    constexpr int QD = decltype(qd)::value;
    const __m512 wv = weights(qd);
    __m512(&acc)[TB] = U == 4 && QD % 2 == 1 ? B : A;
    for (int t = 0; t < TB; ++t) acc[t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xs + t * ldx + 16 * QD), acc[t]);
  };
  quarter(std::integral_constant<int, 0>{});
  quarter(std::integral_constant<int, 1>{});
  quarter(std::integral_constant<int, 2>{});
  quarter(std::integral_constant<int, 3>{});
}

// A and B of vbmi_step_fma as the 8-lane copies' accumulators acc[u] (u = 0, 1 the halves of A; 2, 3 those of B).
template <int TB, int U>
__attribute__((target(SGK_VBMI_TARGET))) inline void vbmi_hand_over(const __m512 (&A)[TB], const __m512 (&B)[TB],
                                                                   __m256 (&acc)[U][TB]) {
  for (int t = 0; t < TB; ++t) {
    acc[0][t] = _mm512_castps512_ps256(A[t]);
    acc[1][t] = _mm512_extractf32x8_ps(A[t], 1);
    if constexpr (U == 4) {
      acc[2][t] = _mm512_castps512_ps256(B[t]);
      acc[3][t] = _mm512_extractf32x8_ps(B[t], 1);
    }
  }
}

// Up to 4 tokens of one row of bfloat16 values, 64 columns a step (AVX-512 VBMI; sparse_row_avx2's sums, bit for
// bit): the step's (at most 64) values in two registers, every column's position among them from step_ranks, and per
// 16 columns one masked two-table word permutation that puts each kept column's value in the high half of its
// float32 lane (0 elsewhere). About 40 instructions per 64 columns against about 8 per 8 in the byte-shuffle
// expansion. The 16-lane accumulator A holds sparse_row_avx2's accumulators 0 and 1 in its halves (chunks c with
// c % U = 0, 1), B (U = 4) 2 and 3, so every lane sees the same FMAs in the same order; the columns after the last
// whole step go on in finish_row_avx2 with those accumulators.
template <int TB>
__attribute__((target(SGK_VBMI_TARGET))) inline void sparse_row_vbmi(const SparseRows<uint16_t>& w, const float* x,
                                                                    int64_t ldx, int64_t r, float* out) {
  constexpr int U = TB == 1 ? 4 : 2;
  const VbmiConsts& vc = vbmi_consts();
  __m512 A[TB], B[TB];
  for (int t = 0; t < TB; ++t) A[t] = B[t] = _mm512_setzero_ps();
  const uint8_t* m = w.mask + r * w.ldm;
  const uint16_t* v = w.values + w.offsets[r];
  const uint16_t* const end = w.values + w.offsets[w.rows] + kPadValues;  // what the buffer holds
  const int64_t steps = w.cols / 64;
  for (int64_t s = 0; s < steps; ++s) {
    uint64_t q, starts;
    std::memcpy(&q, m + 8 * s, sizeof q);
    const __m512i rank = step_ranks(q, vc, &starts);
    const __m512i pos = _mm512_add_epi8(rank, bytes_to_lanes(starts, vc));  // 0..63
    const auto total = static_cast<unsigned>(_mm_popcnt_u64(q));
    __m512i v0, v1;
    if (v + 64 <= end) {  // plain loads: masked ones measured 2x slower from memory (they defeat the prefetcher)
      v0 = _mm512_loadu_si512(v);
      v1 = _mm512_loadu_si512(v + 32);
    } else {  // the buffer's last 64 values: only what the step keeps
      v0 = _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, total), v);
      v1 = _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, total > 32 ? total - 32 : 0), v + 32);
    }
    v += total;
    vbmi_step_fma<TB, U>(
        [&](auto qd) __attribute__((target(SGK_VBMI_TARGET))) {
          constexpr int QD = decltype(qd)::value;
          const __m512i idx = _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(pos, QD)), 16);
          const auto keep = static_cast<__mmask32>(_pdep_u32(static_cast<unsigned>(q >> (16 * QD)) & 0xFFFFu,
                                                              0xAAAAAAAAu));
          return _mm512_castsi512_ps(_mm512_maskz_permutex2var_epi16(keep, v0, idx, v1));
        },
        x + 64 * s, ldx, A, B);
  }
  __m256 acc[U][TB];
  vbmi_hand_over<TB, U>(A, B, acc);
  finish_row_avx2<uint16_t, TB, U>(w, x, ldx, m, v, 8 * steps, acc, out);
}

// The 16 columns of one chunk of a row with mask bits `bits`, whose float32 values start at v (AVX-512).
__attribute__((target("avx512f,avx512bw,avx512vl,popcnt"))) inline __m512 expand16(const float* v, __mmask16 bits) {
  return _mm512_maskz_expandloadu_ps(bits, v);
}

// Up to 4 tokens of one row of float32 values, 16 columns a chunk (AVX-512F/BW/VL), U chunks a step as in
// sparse_row_avx2.
template <typename V, int TB>
__attribute__((target("avx512f,avx512bw,avx512vl,popcnt"))) inline void sparse_row_avx512(const SparseRows<V>& w,
                                                                                           const float* x,
                                                                                           int64_t ldx, int64_t r,
                                                                                           float* out) {
  constexpr int U = TB == 1 ? 4 : 2;
  __m512 acc[U][TB];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < TB; ++t) acc[u][t] = _mm512_setzero_ps();
  const uint8_t* m = w.mask + r * w.ldm;
  const V* v = w.values + w.offsets[r];
  const int64_t full = w.cols / 16;
  int64_t c = 0;
  for (; c + U <= full; c += U) {
    const V* vu[U];
    uint16_t bits[U];
    for (int u = 0; u < U; ++u) {
      std::memcpy(&bits[u], m + 2 * (c + u), sizeof(uint16_t));  // columns 16(c+u) .. +15, lowest bit first
      vu[u] = v;
      v += _mm_popcnt_u32(bits[u]);
    }
    for (int u = 0; u < U; ++u) {
      const __m512 wv = expand16(vu[u], static_cast<__mmask16>(bits[u]));
      const float* xc = x + (c + u) * 16;
      for (int t = 0; t < TB; ++t) acc[u][t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xc + t * ldx), acc[u][t]);
    }
  }
  for (; c < full; ++c) {
    uint16_t bits;
    std::memcpy(&bits, m + 2 * c, sizeof bits);
    const __m512 wv = expand16(v, static_cast<__mmask16>(bits));
    v += _mm_popcnt_u32(bits);
    for (int t = 0; t < TB; ++t) acc[0][t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * ldx + c * 16), acc[0][t]);
  }
  for (int t = 0; t < TB; ++t) {
    __m512 a = acc[0][t];
    for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[u][t]);
    out[t] = _mm512_reduce_add_ps(a);
  }
  for (int64_t j = full * 16; j < w.cols; ++j) {  // a partial last chunk
    if ((m[j >> 3] >> (j & 7)) & 1) {
      const float wj = value_of(*v++);
      for (int t = 0; t < TB; ++t) out[t] += wj * x[t * ldx + j];
    }
  }
}

// 16 columns of bfloat16 values as 16-bit words in their columns, 0 elsewhere (two chunks of 8, mask bytes b0 and b1,
// values from v0 and v1): the two chunks' raw values in the two halves of a register and one byte shuffle.
__attribute__((target("avx2"))) inline __m256i expand16_words(const uint16_t* v0, const uint16_t* v1, int b0, int b1,
                                                              const ExpandTable& tab) {
  const __m256i vals = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v0))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(v1)), 1);
  const __m256i ctl = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(tab.words[b0]))),
      _mm_load_si128(reinterpret_cast<const __m128i*>(tab.words[b1])), 1);
  return _mm256_shuffle_epi8(vals, ctl);
}

// Accumulator chains per token of the bfloat16 dot-product copies (sparse_row_bf16, sparse_row_bf16_vbmi2 and
// sparse_code_row_bf16 of sparse_codes.h): 32-column step s adds into chain s % U, and the chains are summed in order
// at the end. At 1 token four chains hide the instruction's latency (one chain measured 1.2-1.5x slower); from 2
// tokens on the tokens' own chains do.
template <int TB>
constexpr int kDotChains = TB == 1 ? 4 : 1;

template <int U, int TB>
__attribute__((target("avx512f"))) inline void zero_dot_chains(__m512 (&acc)[U][TB]) {
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < TB; ++t) acc[u][t] = _mm512_setzero_ps();
}

// acc[t] += the dot products of the 32 words wv with token t's 32 bfloat16 x from xs on (one vdpbf16ps each).
template <int TB>
__attribute__((target("avx512f,avx512bf16"))) inline void dot_tokens(__m512 (&acc)[TB], __m512bh wv, const uint16_t* xs,
                                                                    int64_t ldx) {
  for (int t = 0; t < TB; ++t) {
    acc[t] = _mm512_dpbf16_ps(acc[t], wv, reinterpret_cast<__m512bh>(_mm512_loadu_si512(xs + t * ldx)));
  }
}

// step(u, c) for steps c = 0..n-1, step c on chain u = c % U, U steps at a time (u a constant in each call once
// the caller, marked flatten, has inlined this and step).
template <int U, typename Step>
inline void for_dot_chains(int64_t n, Step&& step) {
  int64_t c = 0;
  for (; c + U <= n; c += U)
    for (int u = 0; u < U; ++u) step(u, c + u);
  for (int u = 0; c < n; ++c, ++u) step(u, c);
}

template <int U, int TB>
__attribute__((target("avx512f"))) inline void sum_dot_chains(const __m512 (&acc)[U][TB], float* out) {
  for (int t = 0; t < TB; ++t) {
    __m512 a = acc[0][t];
    for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[u][t]);
    out[t] = _mm512_reduce_add_ps(a);
  }
}

// The columns of a row after its last whole 32-column step (from column `from`, values from v on), one at a time.
template <int TB>
inline void bf16_dot_tail(const SparseRows<uint16_t>& w, const uint8_t* m, const uint16_t* v, const uint16_t* x,
                          int64_t ldx, int64_t from, float* out) {
  for (int64_t j = from; j < w.cols; ++j) {
    if ((m[j >> 3] >> (j & 7)) & 1) {
      const float wj = value_of(*v++);
      for (int t = 0; t < TB; ++t) out[t] += wj * bf16_to_float(x[t * ldx + j]);
    }
  }
}

// Up to 8 tokens of one row of bfloat16 values against bfloat16 x (AVX512-BF16), 32 columns a step: the step's values
// expanded into 32 words and one vdpbf16ps per token (16 lanes, each the sum of two adjacent columns' products:
// exact products, float32 sums; the instruction treats subnormal inputs as 0), into the step's chain (kDotChains).
// The expansion here: two byte shuffles of two 8-column chunks each (AVX-512 CPUs without VBMI2).
#define SGK_BF16_TARGET "avx512f,avx512bw,avx512vl,avx512bf16,avx2,popcnt"
template <int TB>
__attribute__((target(SGK_BF16_TARGET), flatten)) inline void sparse_row_bf16(const SparseRows<uint16_t>& w,
                                                                             const uint16_t* x, int64_t ldx,
                                                                             int64_t r, float* out) {
  constexpr int U = kDotChains<TB>;
  const ExpandTable& tab = expand_table();
  __m512 acc[U][TB];
  zero_dot_chains(acc);
  const uint8_t* m = w.mask + r * w.ldm;
  const uint16_t* v = w.values + w.offsets[r];
  const int64_t full = w.cols / 32;
  for_dot_chains<U>(full, [&](int u, int64_t c) __attribute__((target(SGK_BF16_TARGET))) {
    const uint8_t* mb = m + 4 * c;
    const uint16_t* v1 = v + _mm_popcnt_u32(mb[0]);
    const uint16_t* v2 = v1 + _mm_popcnt_u32(mb[1]);
    const uint16_t* v3 = v2 + _mm_popcnt_u32(mb[2]);
    const __m256i lo = expand16_words(v, v1, mb[0], mb[1], tab);
    const __m256i hi = expand16_words(v2, v3, mb[2], mb[3], tab);
    v = v3 + _mm_popcnt_u32(mb[3]);
    const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
    dot_tokens<TB>(acc[u], wv, x + 32 * c, ldx);
  });
  sum_dot_chains<U, TB>(acc, out);
  bf16_dot_tail<TB>(w, m, v, x, ldx, full * 32, out);
}

#define SGK_VBMI2_BF16_TARGET "avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi2,avx2,popcnt,bmi2"

// Whether this CPU has what sparse_row_bf16_vbmi2 uses: the bfloat16 dot products and VBMI2's word expansion.
inline bool cpu_has_bf16_expand() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
                          __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("bmi2");
  return has;
}

// The 32 words of step c (columns 32c .. 32c + 31) of a row with mask m whose next values start at v, 0 where not
// kept, by one vpexpandw (VBMI2); v moves past the step's values. A plain 32-value load where the buffer holds them
// (`end`; a masked load from memory defeats the prefetcher), else only the step's values.
__attribute__((target(SGK_VBMI2_BF16_TARGET))) inline __m512i expand_words32(const uint8_t* m, int64_t c,
                                                                             const uint16_t*& v, const uint16_t* end) {
  uint32_t q;
  std::memcpy(&q, m + 4 * c, sizeof q);
  const unsigned count = _mm_popcnt_u32(q);
  const __m512i vals = v + 32 <= end ? _mm512_loadu_si512(v) : _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, count), v);
  v += count;
  return _mm512_maskz_expand_epi16(q, vals);
}

// sparse_row_bf16 on CPUs with VBMI2: the step's 32 words by one vpexpandw of the (up to 32) values that follow
// under the step's 32 mask bits (expand_words32), instead of two table look-ups and two byte shuffles. The same words
// and the same dot products and chains, so the same bits.
template <int TB>
__attribute__((target(SGK_VBMI2_BF16_TARGET), flatten)) inline void sparse_row_bf16_vbmi2(
    const SparseRows<uint16_t>& w, const uint16_t* x, int64_t ldx, int64_t r, float* out) {
  constexpr int U = kDotChains<TB>;
  __m512 acc[U][TB];
  zero_dot_chains(acc);
  const uint8_t* m = w.mask + r * w.ldm;
  const uint16_t* v = w.values + w.offsets[r];
  const uint16_t* const end = w.values + w.offsets[w.rows] + kPadValues;  // what the buffer holds
  const int64_t full = w.cols / 32;
  for_dot_chains<U>(full, [&](int u, int64_t c) __attribute__((target(SGK_VBMI2_BF16_TARGET))) {
    dot_tokens<TB>(acc[u], reinterpret_cast<__m512bh>(expand_words32(m, c, v, end)), x + 32 * c, ldx);
  });
  sum_dot_chains<U, TB>(acc, out);
  bf16_dot_tail<TB>(w, m, v, x, ldx, full * 32, out);
}

// Whether this CPU has the bfloat16 dot products of sparse_rows_bf16.
inline bool cpu_has_bf16_dot() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return has;
}

__attribute__((target("popcnt"))) inline int64_t count_bits_popcnt(const uint8_t* p, int64_t n) {
  return count_bits_portable(p, n);
}

// Row r of the dense weight (sparse_rows_to_dense's bits) from bfloat16 values on VBMI2: 32 columns a step, the
// words of expand_words32 stored; `end` is the end of the values the buffer holds (no padding needed: the loads that
// would pass it are masked to the step's values).
__attribute__((target(SGK_VBMI2_BF16_TARGET))) inline void dense_row_vbmi2(const SparseRows<uint16_t>& w,
                                                                           const uint16_t* end, int64_t r,
                                                                           uint16_t* o) {
  const uint8_t* m = w.mask + r * w.ldm;
  const uint16_t* v = w.values + w.offsets[r];
  const int64_t full = w.cols / 32;
  for (int64_t c = 0; c < full; ++c) _mm512_storeu_si512(o + 32 * c, expand_words32(m, c, v, end));
  for (int64_t j = full * 32; j < w.cols; ++j) o[j] = (m[j >> 3] >> (j & 7)) & 1 ? *v++ : uint16_t{0};
}

// The same for float32 values on AVX-512F, 16 columns a step (vexpandps from a register).
__attribute__((target("avx512f,avx512bw,avx512vl,popcnt"))) inline void dense_row_avx512(const SparseRows<float>& w,
                                                                                        const float* end, int64_t r,
                                                                                        float* o) {
  const uint8_t* m = w.mask + r * w.ldm;
  const float* v = w.values + w.offsets[r];
  const int64_t full = w.cols / 16;
  for (int64_t c = 0; c < full; ++c) {
    uint16_t q;
    std::memcpy(&q, m + 2 * c, sizeof q);
    const unsigned count = _mm_popcnt_u32(q);
    const auto head = static_cast<__mmask16>((1u << count) - 1u);
    const __m512 vals = v + 16 <= end ? _mm512_loadu_ps(v) : _mm512_maskz_loadu_ps(head, v);
    _mm512_storeu_ps(o + 16 * c, _mm512_maskz_expand_ps(static_cast<__mmask16>(q), vals));
    v += count;
  }
  for (int64_t j = full * 16; j < w.cols; ++j) o[j] = (m[j >> 3] >> (j & 7)) & 1 ? *v++ : 0.0f;
}

template <typename V, int TB>
inline void sparse_row_simd(Simd simd, const SparseRows<V>& w, const float* x, int64_t ldx, int64_t r, float* out) {
  // bfloat16 values take the byte-shuffle expansion of the AVX2 copy on AVX-512 machines too: it measured faster
  // than widening them for vexpandps (benchmarks/RESULTS.md)
  if constexpr (sizeof(V) == 4) {
    if (simd == Simd::kAvx512) return sparse_row_avx512<V, TB>(w, x, ldx, r, out);
  } else if constexpr (TB <= 3) {  // at 4 tokens the 8-column chunks measured as fast (benchmarks/RESULTS.md)
    if (simd == Simd::kAvx512 && cpu_has_vbmi()) return sparse_row_vbmi<TB>(w, x, ldx, r, out);
  }
  sparse_row_avx2<V, TB>(w, x, ldx, r, out);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

#ifndef SGK_HAVE_SPARSE_SIMD
inline bool cpu_has_bf16_dot() { return false; }
inline bool cpu_has_bf16_expand() { return false; }
#endif

// f(j) for every kept column j of a mask row of `ldm` bytes, left to right.
template <typename F>
inline void each_kept(const uint8_t* m, int64_t ldm, F&& f) {
  for (int64_t b = 0; b < ldm; ++b) {
    for (unsigned bits = m[b]; bits != 0; bits &= bits - 1) f(b * 8 + __builtin_ctz(bits));
  }
}

// Rows [r0, r1) of the dense weight (row-major, leading dimension cols, every entry written): the kept values in
// their columns, zeros elsewhere. Values are copied as they are (V's bits), so the result is exactly the weight.
template <typename V>
void sparse_rows_to_dense(const SparseRows<V>& w, V* out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    V* o = out + r * w.cols;
    std::memset(o, 0, sizeof(V) * static_cast<size_t>(w.cols));
    const V* v = w.values + w.offsets[r];
    each_kept(w.mask + r * w.ldm, w.ldm, [&](int64_t j) { o[j] = *v++; });
  }
}

// sparse_rows_to_dense with the widest copy `simd` and the CPU allow (AVX-512: float32 values 16 columns a step;
// bfloat16 values 32 a step where the CPU has VBMI2), the same bits; the values buffer holds offsets[rows] entries.
template <typename V>
void sparse_rows_to_dense(Simd simd, const SparseRows<V>& w, V* out, int64_t r0, int64_t r1) {
#ifdef SGK_HAVE_SPARSE_SIMD
  const V* const end = w.values + w.offsets[w.rows];
  if constexpr (sizeof(V) == 4) {
    if (simd == Simd::kAvx512) {
      for (int64_t r = r0; r < r1; ++r) dense_row_avx512(w, end, r, out + r * w.cols);
      return;
    }
  } else {
    if (simd == Simd::kAvx512 && cpu_has_bf16_expand()) {
      for (int64_t r = r0; r < r1; ++r) dense_row_vbmi2(w, end, r, out + r * w.cols);
      return;
    }
  }
#endif
  (void)simd;
  sparse_rows_to_dense(w, out, r0, r1);
}

// Bits set in the `n` mask bytes at p (with the popcnt instruction where the SIMD copies run).
inline int64_t count_bits(Simd simd, const uint8_t* p, int64_t n) {
#ifdef SGK_HAVE_SPARSE_SIMD
  if (simd != Simd::kBaseline) return count_bits_popcnt(p, n);
#endif
  (void)simd;
  return count_bits_portable(p, n);
}

// f(std::integral_constant<int, TB>{}) with TB = tb for tb in 1..G - 1, else G: a token count as a template argument.
template <int G, int I = 1, typename F>
inline void with_token_count(int64_t tb, F&& f) {
  if constexpr (I < G) {
    if (tb == I) return f(std::integral_constant<int, I>{});
    return with_token_count<G, I + 1>(tb, std::forward<F>(f));
  } else {
    return f(std::integral_constant<int, G>{});
  }
}

// Rows [r0, r1) for T tokens in groups of up to G: row(xt, tb, r, out) writes row r's dot products with the tb
// tokens at xt into out, and y gets them plus the bias.
template <int G, typename X, typename Row>
inline void by_token_groups(const X* x, int64_t T, int64_t ldx, const float* bias, float* y, int64_t ldy, int64_t r0,
                            int64_t r1, Row&& row) {
  float out[G];
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t t0 = 0; t0 < T; t0 += G) {
      const int64_t tb = T - t0 < G ? T - t0 : G;
      row(x + t0 * ldx, tb, r, out);
      for (int64_t t = 0; t < tb; ++t) y[(t0 + t) * ldy + r] = bias != nullptr ? out[t] + bias[r] : out[t];
    }
  }
}

// Rows [r0, r1) for T tokens with the widest copy `simd` allows (baseline: sparse_rows_scalar); tokens go in groups
// of up to 4 (each group one pass over the row's values).
template <typename V>
void sparse_rows(Simd simd, const SparseRows<V>& w, const float* x, int64_t T, int64_t ldx, const float* bias,
                 float* y, int64_t ldy, int64_t r0, int64_t r1) {
#ifdef SGK_HAVE_SPARSE_SIMD
  if (simd != Simd::kBaseline) {
    by_token_groups<4>(x, T, ldx, bias, y, ldy, r0, r1, [&](const float* xt, int64_t tb, int64_t r, float* out) {
      switch (tb) {
        case 1: return sparse_row_simd<V, 1>(simd, w, xt, ldx, r, out);
        case 2: return sparse_row_simd<V, 2>(simd, w, xt, ldx, r, out);
        case 3: return sparse_row_simd<V, 3>(simd, w, xt, ldx, r, out);
        default: return sparse_row_simd<V, 4>(simd, w, xt, ldx, r, out);
      }
    });
    return;
  }
#endif
  (void)simd;
  sparse_rows_scalar(w, x, T, ldx, bias, y, ldy, r0, r1);
}

// Rows [r0, r1) for T tokens of bfloat16 x (leading dimension ldx) with bfloat16 values, on the bfloat16 dot
// products (callers check cpu_has_bf16_dot()); tokens go in groups of up to 8. The VBMI2 copy where the CPU has it
// and allow_expand (false: the byte-shuffle copy, for the tests; both give the same bits).
inline void sparse_rows_bf16(const SparseRows<uint16_t>& w, const uint16_t* x, int64_t T, int64_t ldx,
                             const float* bias, float* y, int64_t ldy, int64_t r0, int64_t r1,
                             bool allow_expand = true) {
#ifdef SGK_HAVE_SPARSE_SIMD
  const bool expand = allow_expand && cpu_has_bf16_expand();
  by_token_groups<8>(x, T, ldx, bias, y, ldy, r0, r1, [&](const uint16_t* xt, int64_t tb, int64_t r, float* out) {
    with_token_count<8>(tb, [&](auto TB) {
      if (expand) return sparse_row_bf16_vbmi2<decltype(TB)::value>(w, xt, ldx, r, out);
      sparse_row_bf16<decltype(TB)::value>(w, xt, ldx, r, out);
    });
  });
#else
  (void)w, (void)x, (void)T, (void)ldx, (void)bias, (void)y, (void)ldy, (void)r0, (void)r1, (void)allow_expand;
#endif
}

}  // namespace sgk
