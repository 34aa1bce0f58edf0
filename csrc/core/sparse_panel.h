// y = x Wᵀ (+ b) for many tokens (a prompt) straight from a compressed weight (docs/sparse_format.md), without the
// dense weight: the "panel" kernel. Torch-free; the ATen operators ext_sparse_linear_panel and
// ext_sparse_codes_linear_panel (csrc/cpu/ops.cpp) call it.
//
// The row kernels of sparse_linear.h stream the weight once per group of up to 8 tokens and multiply each kept value
// with one token's x at a time; at prompt lengths that is one pass over the weight per 8 tokens. Here x comes
// transposed: a panel P (cols, S) float32, row j holding column j of up to S = 16 K tokens (K = 1..8 registers of 16
// lanes, padded with zeros), so one kept weight W[r, j] is one broadcast and K fused multiply-adds of the panel's row
// j into row r's K accumulators, for all S tokens at once, and the weight is read once per S tokens. Per kept weight
// that is K + 1 loads for K FMAs, so the panel's rows have to come from L1: the columns go in blocks whose panel rows
// fill 32 KB (panel_block_cols), each row's kept columns of a block listed by one vpcompressd per 16 columns, the
// accumulators kept in yT (rows, S) between blocks. The values come as float32 in row order (row r's from
// PanelRows::row_values): the caller widens bfloat16 values, or decodes codes (decode_code_rows), one block of rows
// at a time.
//
// Every output sums its row's kept products in column order, one fused multiply-add each, from 0, then adds the
// bias: panel_rows_scalar is that specification, and the AVX-512 and AVX2 copies give its bits (the AVX2 copy holds
// a row's S tokens in 8-lane registers and, where the accumulators would not fit its 16 registers, goes over the
// row's kept columns once per slice of the tokens).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "sparse_codes.h"  // the mask layout, SparseCodes, code_weight, load_group

namespace sgk {

// Tokens of one panel (16 lanes times at most 8 registers).
constexpr int64_t kPanelMaxTokens = 128;
// Rows of one call of the panel kernel (its cursor of the rows' values is on the stack).
constexpr int64_t kPanelMaxRows = 512;
// Floats of panel rows a column block holds: 32 KB, within the L1 data cache of the x86 cores this runs on (48 KB
// and more), with room left for the weights and yT that stream through it.
constexpr int64_t kPanelBlockFloats = 8192;

// The panel's width (lanes a token row of it holds) for T tokens: 16 ceil(T / 16), at most kPanelMaxTokens.
inline int64_t panel_width(int64_t T) {
  const int64_t s = (T + 15) / 16 * 16;
  return s < 16 ? 16 : s > kPanelMaxTokens ? kPanelMaxTokens : s;
}

// Columns of a block for panel width S: the most whose panel rows fit kPanelBlockFloats, a multiple of 16.
inline int64_t panel_block_cols(int64_t S) {
  const int64_t c = kPanelBlockFloats / S / 16 * 16;
  return c < 16 ? 16 : c;
}

// Rows per call for a weight keeping `avg` values per row, for panel width S: (S + 16) K values, between 16 and
// kPanelMaxRows (for 2048 values a row: 16 rows at S = 16, 72 at S = 128). Each row is one stream of values through
// the column blocks, and at narrow panels, with little work per value, more streams than the prefetchers follow
// measured slower; at wide ones more rows share each block of the panel (benchmarks/RESULTS.md).
inline int64_t panel_block_rows(int64_t avg, int64_t S) {
  const int64_t r = (S + 16) * 1024 / (avg < 1 ? 1 : avg);
  return r < 16 ? 16 : r > kPanelMaxRows ? kPanelMaxRows : r;
}

// A compressed weight as the panel kernel reads it: the mask, and float32 values with row r's first at
// values[kept[r - first] - base] (its count kept[r - first + 1] - kept[r - first]).
struct PanelRows {
  int64_t rows = 0, cols = 0;
  const uint8_t* mask = nullptr;
  int64_t ldm = 0;  // bytes per mask row: (cols + 7) / 8
  const int64_t* kept = nullptr;
  int64_t first = 0, base = 0;
  const float* values = nullptr;
  const float* row_values(int64_t r) const { return values + (kept[r - first] - base); }
};

// Accumulator chains of the panel kernel at K registers a row: enough that 8 FMAs are in flight (two FMA ports of 4
// cycles' latency); with fewer a row's sums wait on each other.
constexpr int panel_chains(int K) { return (8 + K - 1) / K; }

// Rows [r0, r1) of yT (rows, S): yT[r, t] = the sum over row r's kept columns j of W[r, j] P[j, t], plus bias[r];
// the specification of the SIMD copy (mask bits beyond cols are not read). The order: the columns go in blocks of
// panel_block_cols(S); in a block, kept product number k (counted from the block's first) is fused-multiply-added
// into chain k % U (U = panel_chains(S / 16)), chain 0 starting from the row's sum so far and the others from 0, and
// at the block's end the row's sum is ((chain 0 + chain 1) + chain 2) + ...; at U = 1, one FMA per kept weight in
// column order.
inline void panel_rows_scalar(const PanelRows& w, const float* P, int64_t S, const float* bias, float* yT, int64_t r0,
                              int64_t r1) {
  const int64_t block = panel_block_cols(S);
  const int U = panel_chains(static_cast<int>(S / 16));
  float chain[8];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = w.mask + r * w.ldm;
    for (int64_t t = 0; t < S; ++t) {
      const float* v = w.row_values(r);
      float acc = 0.0f;
      for (int64_t c0 = 0; c0 < w.cols; c0 += block) {
        const int64_t c1 = c0 + block < w.cols ? c0 + block : w.cols;
        chain[0] = acc;
        for (int u = 1; u < U; ++u) chain[u] = 0.0f;
        int64_t k = 0;
        for (int64_t j = c0; j < c1; ++j) {
          if ((m[j >> 3] >> (j & 7)) & 1) {
            float& c = chain[k++ % U];
            c = std::fma(*v++, P[j * S + t], c);
          }
        }
        acc = chain[0];
        for (int u = 1; u < U; ++u) acc += chain[u];
      }
      yT[r * S + t] = bias != nullptr ? acc + bias[r] : acc;
    }
  }
}

// The float32 of n bfloat16 values (their raw bits).
inline void widen_bf16(const uint16_t* v, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(v[i]);
}

// Bits set among the n mask bits from bit `from` of a mask row.
inline int64_t count_bits_range(const uint8_t* m, int64_t from, int64_t n) {
  if ((from & 7) == 0 && (n & 7) == 0) return count_bits_portable(m + (from >> 3), n >> 3);
  int64_t c = 0;
  for (int64_t j = from; j < from + n; ++j) c += (m[j >> 3] >> (j & 7)) & 1;
  return c;
}

// The float32 weights of rows [r0, r1) of a jointly quantized weight, in row order (what the codes stand for, bit
// for bit: code_weight), one quantization group at a time: row r's from out[kept[r - r0]], kept[0] = 0 and
// kept[r1 - r0] their number. The specification of decode_code_rows_avx512.
inline void decode_code_rows_scalar(const SparseCodes& w, int64_t r0, int64_t r1, float* out, int64_t* kept) {
  kept[0] = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = w.mask + r * w.ldm;
    const uint8_t* p = w.codes + w.offsets[r];
    float* o = out + kept[r - r0];
    int64_t k = 0;
    for (int64_t g = 0; g < w.cols / w.group; ++g) {
      const int64_t n = count_bits_range(m, g * w.group, w.group);
      for (int64_t i = 0; i < n; ++i, ++k) o[k] = code_weight(w, r, g, code_at(p, k, w.bits));
    }
    kept[r - r0 + 1] = kept[r - r0] + k;
  }
}

#ifdef SGK_HAVE_SPARSE_SIMD
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define SGK_PANEL_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,popcnt,bmi2"

// Whether this CPU has what the panel kernel uses (AVX-512F/BW/VL/DQ, BMI2).
inline bool cpu_has_panel() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  return has;
}

// The 16 mask bits of columns c .. c + 15 of a mask row (c a multiple of 16; the bits from cols on cleared).
inline uint32_t mask16(const uint8_t* m, int64_t ldm, int64_t cols, int64_t c) {
  const int64_t b = c >> 3;
  uint32_t q = m[b];
  if (b + 1 < ldm) q |= static_cast<uint32_t>(m[b + 1]) << 8;
  if (cols - c < 16) q &= (1u << (cols - c)) - 1u;
  return q;
}

// The walk the SIMD copies share (r1 - r0 <= kPanelMaxRows): per column block of panel_block_cols(S) and row r,
// row(r, c0, c1, first, last, v) adds the block's products into row r of yT (first: the row's first block, whose
// sums start from 0; last: its last, which adds the bias) from the row's values at v on, and returns how many it
// used (the block's kept columns). A layer without columns gets the bias alone.
template <typename Row>
inline void panel_walk(const PanelRows& w, int64_t S, const float* bias, float* yT, int64_t r0, int64_t r1,
                       Row&& row) {
  int64_t cur[kPanelMaxRows];
  for (int64_t r = r0; r < r1; ++r) cur[r - r0] = w.row_values(r) - w.values;
  if (w.cols == 0) {
    for (int64_t r = r0; r < r1; ++r) std::fill(yT + r * S, yT + (r + 1) * S, bias != nullptr ? bias[r] : 0.0f);
    return;
  }
  const int64_t block = panel_block_cols(S);
  for (int64_t c0 = 0; c0 < w.cols; c0 += block) {
    const int64_t c1 = c0 + block < w.cols ? c0 + block : w.cols;
    for (int64_t r = r0; r < r1; ++r) cur[r - r0] += row(r, c0, c1, c0 == 0, c1 == w.cols, w.values + cur[r - r0]);
  }
}

// panel_rows_scalar for S = 16 K tokens on AVX-512 (r1 - r0 <= kPanelMaxRows). Per column block and row: the row's
// kept columns of the block as int32 indices (one vpcompressd of the column numbers per 16 columns), then per kept
// column one broadcast of its value and K FMAs with the panel's row into its chain's K registers, each lane one
// token's sums in the specification's order.
template <int K>
__attribute__((target(SGK_PANEL_TARGET), flatten)) void panel_rows_avx512(const PanelRows& w, const float* P,
                                                                           const float* bias, float* yT,
                                                                           int64_t r0, int64_t r1) {
  constexpr int64_t S = 16 * K;
  constexpr int U = panel_chains(K);
  alignas(64) int32_t idx[kPanelBlockFloats / 16 + 16];  // block <= kPanelBlockFloats / 16, plus one store's spill
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  panel_walk(w, S, bias, yT, r0, r1,
             [&](int64_t r, int64_t c0, int64_t c1, bool first, bool last, const float* v)
                 __attribute__((target(SGK_PANEL_TARGET))) {
    const uint8_t* m = w.mask + r * w.ldm;
    int64_t n = 0;
    for (int64_t c = c0; c < c1; c += 16) {
      const uint32_t q = mask16(m, w.ldm, w.cols, c);
      const __m512i cols = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(c)));
      _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(static_cast<__mmask16>(q), cols));
      n += _mm_popcnt_u32(q);
    }
    float* y = yT + r * S;
    __m512 acc[U][K];
    for (int j = 0; j < K; ++j) acc[0][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(y + 16 * j);
    for (int u = 1; u < U; ++u) {
      for (int j = 0; j < K; ++j) acc[u][j] = _mm512_setzero_ps();
    }
    int64_t k = 0;
    for (; k + U <= n; k += U) {
      for (int u = 0; u < U; ++u) {
        const __m512 b = _mm512_set1_ps(v[k + u]);
        const float* p = P + static_cast<int64_t>(idx[k + u]) * S;
        for (int j = 0; j < K; ++j) acc[u][j] = _mm512_fmadd_ps(b, _mm512_loadu_ps(p + 16 * j), acc[u][j]);
      }
    }
    for (int u = 0; u + 1 < U; ++u) {  // the last n % U products, into chains 0, 1, ...
      if (k + u >= n) break;
      const __m512 b = _mm512_set1_ps(v[k + u]);
      const float* p = P + static_cast<int64_t>(idx[k + u]) * S;
      for (int j = 0; j < K; ++j) acc[u][j] = _mm512_fmadd_ps(b, _mm512_loadu_ps(p + 16 * j), acc[u][j]);
    }
    for (int u = 1; u < U; ++u) {
      for (int j = 0; j < K; ++j) acc[0][j] = _mm512_add_ps(acc[0][j], acc[u][j]);
    }
    if (last && bias != nullptr) {
      const __m512 b = _mm512_set1_ps(bias[r]);
      for (int j = 0; j < K; ++j) acc[0][j] = _mm512_add_ps(acc[0][j], b);
    }
    for (int j = 0; j < K; ++j) _mm512_storeu_ps(y + 16 * j, acc[0][j]);
    return n;
  });
}

#define SGK_PANEL_AVX2_TARGET "avx2,fma,f16c,popcnt,bmi2"

// Whether this CPU has what the panel kernel's AVX2 copy uses (AVX2, FMA, F16C, BMI2).
inline bool cpu_has_panel_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2") &&
                          __builtin_cpu_supports("popcnt");
  return has;
}

// Per mask byte m: pos[m][i] is the column (0..7) of its i-th set bit (the entries past the popcount are 0): the
// kept columns of 8 as one table row, AVX2's stand-in for vpcompressd.
struct ColumnTable {
  alignas(32) int32_t pos[256][8];
  ColumnTable() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int i = 0; i < 8; ++i) pos[m][i] = 0;
      for (int i = 0; i < 8; ++i) {
        if ((m >> i) & 1) pos[m][n++] = i;
      }
    }
  }
};

inline const ColumnTable& column_table() {
  static const ColumnTable table;
  return table;
}

// Lanes 8 off .. 8 (off + L) - 1 of one row's yT for one column block (n kept columns listed in idx, their values
// from v): the specification's U chains, each in L registers of 8 lanes (the tokens of a lane are independent, so the
// S tokens can go in slices, each a pass over the row's kept columns, with the specification's sums in every lane).
template <int U, int L, int64_t S>
__attribute__((target(SGK_PANEL_AVX2_TARGET))) inline void panel_slice_avx2(const float* P, const int32_t* idx,
                                                                          const float* v, int64_t n, float* y,
                                                                          int off, bool first, const float* bias) {
  __m256 acc[U][L];
  for (int l = 0; l < L; ++l) acc[0][l] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + 8 * (off + l));
  for (int u = 1; u < U; ++u) {
    for (int l = 0; l < L; ++l) acc[u][l] = _mm256_setzero_ps();
  }
  int64_t k = 0;
  for (; k + U <= n; k += U) {
    for (int u = 0; u < U; ++u) {
      const __m256 b = _mm256_broadcast_ss(v + k + u);
      const float* p = P + static_cast<int64_t>(idx[k + u]) * S + 8 * off;
      for (int l = 0; l < L; ++l) acc[u][l] = _mm256_fmadd_ps(b, _mm256_loadu_ps(p + 8 * l), acc[u][l]);
    }
  }
  for (int u = 0; u + 1 < U; ++u) {  // the last n % U products, into chains 0, 1, ...
    if (k + u >= n) break;
    const __m256 b = _mm256_broadcast_ss(v + k + u);
    const float* p = P + static_cast<int64_t>(idx[k + u]) * S + 8 * off;
    for (int l = 0; l < L; ++l) acc[u][l] = _mm256_fmadd_ps(b, _mm256_loadu_ps(p + 8 * l), acc[u][l]);
  }
  for (int u = 1; u < U; ++u) {
    for (int l = 0; l < L; ++l) acc[0][l] = _mm256_add_ps(acc[0][l], acc[u][l]);
  }
  if (bias != nullptr) {
    const __m256 b = _mm256_set1_ps(*bias);
    for (int l = 0; l < L; ++l) acc[0][l] = _mm256_add_ps(acc[0][l], b);
  }
  for (int l = 0; l < L; ++l) _mm256_storeu_ps(y + 8 * (off + l), acc[0][l]);
}

// The slices of a row from register Off on: as many registers a slice as 12 accumulators allow (12 / U), the
// panel's 2K registers of 8 lanes in order.
template <int K, int U, int Off>
__attribute__((target(SGK_PANEL_AVX2_TARGET))) inline void panel_slices_avx2(const float* P, const int32_t* idx,
                                                                           const float* v, int64_t n, float* y,
                                                                           bool first, const float* bias) {
  constexpr int kMax = 12 / U > 0 ? 12 / U : 1;
  constexpr int L = 2 * K - Off < kMax ? 2 * K - Off : kMax;
  panel_slice_avx2<U, L, 16 * K>(P, idx, v, n, y, Off, first, bias);
  if constexpr (Off + L < 2 * K) panel_slices_avx2<K, U, Off + L>(P, idx, v, n, y, first, bias);
}

// panel_rows_scalar for S = 16 K tokens on AVX2 (r1 - r0 <= kPanelMaxRows): panel_rows_avx512's blocks and column
// lists, the lists built 8 columns at a time from a table (ColumnTable), the tokens in slices of 8-lane registers.
// Both copies are flattened: the walk, the row's work and the slices are one function, as written by hand.
template <int K>
__attribute__((target(SGK_PANEL_AVX2_TARGET), flatten)) void panel_rows_avx2(const PanelRows& w, const float* P,
                                                                            const float* bias, float* yT,
                                                                            int64_t r0, int64_t r1) {
  constexpr int64_t S = 16 * K;
  constexpr int U = panel_chains(K);
  const ColumnTable& ct = column_table();
  alignas(32) int32_t idx[kPanelBlockFloats / 16 + 8];  // block <= kPanelBlockFloats / 16, plus one store's spill
  panel_walk(w, S, bias, yT, r0, r1,
             [&](int64_t r, int64_t c0, int64_t c1, bool first, bool last, const float* v)
                 __attribute__((target(SGK_PANEL_AVX2_TARGET))) {
    const uint8_t* m = w.mask + r * w.ldm;
    int64_t n = 0;
    for (int64_t c = c0; c < c1; c += 8) {
      unsigned q = m[c >> 3];
      if (c1 - c < 8) q &= (1u << (c1 - c)) - 1u;  // the bits from cols on
      const __m256i cols = _mm256_add_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(ct.pos[q])),
                                            _mm256_set1_epi32(static_cast<int>(c)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + n), cols);
      n += _mm_popcnt_u32(q);
    }
    panel_slices_avx2<K, U, 0>(P, idx, v, n, yT + r * S, first, last && bias != nullptr ? bias + r : nullptr);
    return n;
  });
}

// The 16 weights of a group of 4-bit codes (load_group: a codes 0-7, b 8-15) at 8 codes (int32 lanes): one
// two-table-wide permutation on AVX-512, two 8-lane permutations and a blend on the code's bit 3 on AVX2.
__attribute__((target(SGK_PANEL_TARGET))) inline __m256 lookup16_avx512(__m256 a, __m256 b, __m256i codes) {
  const __m512 table = _mm512_insertf32x8(_mm512_castps256_ps512(a), b, 1);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(_mm512_castsi256_si512(codes), table));
}

__attribute__((target(SGK_PANEL_AVX2_TARGET))) inline __m256 lookup16_avx2(__m256 a, __m256 b, __m256i codes) {
  const __m256 lo = _mm256_permutevar8x32_ps(a, codes), hi = _mm256_permutevar8x32_ps(b, codes);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
}

// decode_code_rows_scalar with SIMD, the same bits: per quantization group its weights as one table (4 bits or
// less: the 16 weights, load_group; codes past 2^bits - 1 do not occur) looked up 8 codes at a time by LOOKUP, the
// nibbles spread to bytes by one pdep; wider codes widened and dequantized in the lanes. Writes up to 7 floats beyond
// the last row's weights (the caller's buffer holds them), reads up to 8 bytes beyond a row's codes
// (kPadCodeBytes). Stamped out once per instruction set (a function's target is fixed, not a template argument).
#define SGK_DECODE_CODE_ROWS(NAME, TARGET, LOOKUP)                                                                   \
  template <Rounding R>                                                                                             \
  __attribute__((target(TARGET))) void NAME(const SparseCodes& w, int64_t r0, int64_t r1, float* out,               \
                                            int64_t* kept) {                                                        \
    const int64_t groups = w.cols / w.group;                                                                        \
    const bool nibbles = w.bits <= 4;                                                                               \
    kept[0] = 0;                                                                                                    \
    for (int64_t r = r0; r < r1; ++r) {                                                                             \
      const uint8_t* m = w.mask + r * w.ldm;                                                                        \
      const uint8_t* p = w.codes + w.offsets[r];                                                                    \
      float* o = out + kept[r - r0];                                                                                \
      int64_t k = 0;                                                                                                \
      for (int64_t g = 0; g < groups; ++g) {                                                                        \
        const int64_t n = count_bits_range(m, g * w.group, w.group);                                                \
        if (n == 0) continue;                                                                                       \
        __m256 a, b;                                                                                                \
        if (nibbles) {                                                                                              \
          load_group<true, R>(w, r * groups + g, a, b);                                                             \
        } else {                                                                                                    \
          load_group<false, R>(w, r * groups + g, a, b);                                                            \
        }                                                                                                           \
        for (int64_t i = k; i < k + n; i += 8) {                                                                    \
          uint64_t u;                                                                                               \
          if (nibbles) {                                                                                            \
            std::memcpy(&u, p + (i >> 1), sizeof u);                                                                \
            const uint64_t bytes = _pdep_u64(u >> ((i & 1) * 4), 0x0F0F0F0F0F0F0F0Full);                             \
            const __m256i c = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(bytes)));               \
            _mm256_storeu_ps(o + i, LOOKUP(a, b, c));                                                               \
          } else {                                                                                                  \
            std::memcpy(&u, p + i, sizeof u);                                                                       \
            const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(u)))); \
            _mm256_storeu_ps(o + i, round_lanes<R>(_mm256_mul_ps(b, _mm256_sub_ps(c, a))));                         \
          }                                                                                                         \
        }                                                                                                           \
        k += n;                                                                                                     \
      }                                                                                                             \
      kept[r - r0 + 1] = kept[r - r0] + k;                                                                          \
    }                                                                                                               \
  }
SGK_DECODE_CODE_ROWS(decode_code_rows_avx512, SGK_PANEL_TARGET, lookup16_avx512)
SGK_DECODE_CODE_ROWS(decode_code_rows_avx2, SGK_PANEL_AVX2_TARGET, lookup16_avx2)
#undef SGK_DECODE_CODE_ROWS
#undef SGK_PANEL_AVX2_TARGET
#undef SGK_PANEL_TARGET
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#else
inline bool cpu_has_panel() { return false; }
inline bool cpu_has_panel_avx2() { return false; }
#endif

// Rows [r0, r1) of yT with the widest copy the CPU and `simd` allow (panel_rows_avx512, else panel_rows_avx2), for
// panel width S (a multiple of 16, at most kPanelMaxTokens; r1 - r0 <= kPanelMaxRows).
inline void panel_rows(Simd simd, const PanelRows& w, const float* P, int64_t S, const float* bias, float* yT,
                       int64_t r0, int64_t r1) {
#ifdef SGK_HAVE_SPARSE_SIMD
  if (simd == Simd::kAvx512 && cpu_has_panel()) {
    return with_token_count<8>(S / 16, [&](auto K) { panel_rows_avx512<decltype(K)::value>(w, P, bias, yT, r0, r1); });
  }
  if (simd != Simd::kBaseline && cpu_has_panel_avx2()) {
    return with_token_count<8>(S / 16, [&](auto K) { panel_rows_avx2<decltype(K)::value>(w, P, bias, yT, r0, r1); });
  }
#endif
  (void)simd;
  panel_rows_scalar(w, P, S, bias, yT, r0, r1);
}

// decode_code_rows_scalar with the AVX-512 or AVX2 copy where `simd` and the CPU allow it (the same bits).
inline void decode_code_rows(Simd simd, const SparseCodes& w, int64_t r0, int64_t r1, float* out, int64_t* kept) {
#ifdef SGK_HAVE_SPARSE_SIMD
  if (simd == Simd::kAvx512 && cpu_has_panel()) {
    switch (w.rounding) {
      case Rounding::kBFloat16: return decode_code_rows_avx512<Rounding::kBFloat16>(w, r0, r1, out, kept);
      case Rounding::kFloat16: return decode_code_rows_avx512<Rounding::kFloat16>(w, r0, r1, out, kept);
      default: return decode_code_rows_avx512<Rounding::kFloat32>(w, r0, r1, out, kept);
    }
  }
  if (simd != Simd::kBaseline && cpu_has_panel_avx2()) {
    switch (w.rounding) {
      case Rounding::kBFloat16: return decode_code_rows_avx2<Rounding::kBFloat16>(w, r0, r1, out, kept);
      case Rounding::kFloat16: return decode_code_rows_avx2<Rounding::kFloat16>(w, r0, r1, out, kept);
      default: return decode_code_rows_avx2<Rounding::kFloat32>(w, r0, r1, out, kept);
    }
  }
#endif
  (void)simd;
  decode_code_rows_scalar(w, r0, r1, out, kept);
}

}  // namespace sgk
