// y = x Wᵀ (+ b) straight from a jointly quantized compressed weight (docs/sparse_format.md): a bitmask of the kept
// weights, their grid codes in row-major order (4 bits or less: two a byte, low nibble first, every row starting on a
// byte; 5..8 bits: one a byte) and per-group float32 scales and uint8 zero points. The weight a kept code c stands for
// is W[r, j] = cast(scale[r, g] * (c - zero[r, g])) in float32, g = j / group, cast the rounding to the model's dtype
// (bfloat16 / float16, round to nearest even; none for float32): exactly the value the pruning wrote, so the kernel
// multiplies with the same weights as the dense model. Torch-free; the ATen operators ext_sparse_codes_linear and
// ext_sparse_codes_to_dense (csrc/cpu/ops.cpp) call it.
//
// Layout read here: mask as in sparse_linear.h; codes (uint8), row r's first byte at offsets[r]; scale (rows, cols /
// group) float32 and zero (same shape) uint8, row-major. x (T, cols) float32; y (T, rows) float32.
//
// The SIMD copy (AVX2 + FMA, every x86 machine with AVX2) sums each row in the order of sparse_row_avx2 of
// sparse_linear.h (8 columns a chunk, the same accumulators): with float32 values equal to the dequantized codes, the
// two kernels give the same bits. Per chunk the kept codes are placed in their lanes and turned into weights:
// 4-bit codes: the chunk's 8 nibbles (a 32-bit window at the row's running nibble) shifted into their lanes by a
// table indexed by the mask byte, then looked up in the group's 16 weights (two 8-lane permutations and a blend;
// on AVX-512VL one masked two-table permutation), built once per group of columns; 5..8-bit codes: 8 bytes
// widened, placed by a permutation, then dequantized and rounded in the lanes. Groups whose size is not a multiple
// of 8 (a chunk would straddle two groups) take the scalar loop. The copies read up to kPadCodeBytes bytes beyond a
// row's last code (never beyond the buffer when it holds that many more bytes than the offsets).
#pragma once

#include <cstdint>
#include <cstring>

#include "sparse_linear.h"  // the mask layout, each_kept, ExpandTable, by_token_groups, float_bits

namespace sgk {

// Bytes a codes buffer must hold beyond offsets[rows] for the SIMD copy's 8-byte reads.
constexpr int64_t kPadCodeBytes = 8;

// How a dequantized float32 weight is rounded to the model's dtype.
enum class Rounding : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct SparseCodes {
  int64_t rows = 0, cols = 0;
  const uint8_t* mask = nullptr;
  int64_t ldm = 0;  // bytes per mask row: (cols + 7) / 8
  const uint8_t* codes = nullptr;
  const int64_t* offsets = nullptr;  // (rows + 1): row r's codes are bytes [offsets[r], offsets[r + 1])
  const float* scale = nullptr;      // (rows, cols / group)
  const uint8_t* zero = nullptr;     // (rows, cols / group)
  int64_t group = 1;                 // columns per quantization group; divides cols
  int bits = 4;                      // 1..8; up to 4: two codes a byte
  Rounding rounding = Rounding::kFloat32;
};

// Bytes of codes a row with `count` kept weights holds.
inline int64_t code_bytes(int64_t count, int bits) { return bits <= 4 ? (count + 1) / 2 : count; }

// f rounded to the nearest bfloat16 (ties to even), as a float32. Finite inputs only (the dequantized weights are).
inline float round_bf16(float f) {
  const uint32_t u = float_bits(f);
  return bits_float((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
}

// f rounded to the nearest float16 (ties to even, subnormals kept, beyond 65504 + half an ulp to infinity), as a
// float32. Finite inputs only.
inline float round_fp16(float f) {
  const uint32_t u = float_bits(f), sign = u & 0x80000000u;
  uint32_t a = u ^ sign;
  if (a >= 0x477FF000u) {  // 65520 and above round to infinity
    a = 0x7F800000u;
  } else if (a < 0x38800000u) {  // below 2^-14: float16 subnormals, multiples of 2^-24
    const float big = bits_float(a) + 0.5f;  // in [0.5, 1) the float32 spacing is 2^-24: one rounding
    a = float_bits(big - 0.5f);
  } else {  // normal: 10 of the 23 mantissa bits kept
    a = (a + 0xFFFu + ((a >> 13) & 1u)) & 0xFFFFE000u;
  }
  return bits_float(a | sign);
}

inline float round_as(float f, Rounding r) {
  return r == Rounding::kBFloat16 ? round_bf16(f) : r == Rounding::kFloat16 ? round_fp16(f) : f;
}

// The IEEE binary16 bits of f, which must be exactly a float16 value (round_fp16's results are).
inline uint16_t fp16_bits_exact(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return sign | 0x7C00u;
  if (a >= 0x38800000u) return sign | static_cast<uint16_t>((a - 0x38000000u) >> 13);
  return sign | static_cast<uint16_t>(bits_float(a) * 16777216.0f);  // m * 2^-24, m < 1024: exact
}

// The weight of kept code `c` in group g of row r: the format's definition.
inline float code_weight(const SparseCodes& w, int64_t r, int64_t g, int c) {
  const int64_t i = r * (w.cols / w.group) + g;
  return round_as(w.scale[i] * (static_cast<float>(c) - static_cast<float>(w.zero[i])), w.rounding);
}

// Kept code number k of a row whose codes start at p.
inline int code_at(const uint8_t* p, int64_t k, int bits) {
  return bits <= 4 ? (p[k >> 1] >> ((k & 1) * 4)) & 0xF : p[k];
}

// Rows [r0, r1) for T tokens, one kept weight at a time: the specification of the SIMD copy.
inline void sparse_code_rows_scalar(const SparseCodes& w, const float* x, int64_t T, int64_t ldx, const float* bias,
                                    float* y, int64_t ldy, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = w.mask + r * w.ldm;
    const uint8_t* p = w.codes + w.offsets[r];
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * ldx;
      float acc = 0.0f;
      int64_t k = 0;
      for (int64_t j = 0; j < w.cols; ++j) {
        if ((m[j >> 3] >> (j & 7)) & 1) acc += code_weight(w, r, j / w.group, code_at(p, k++, w.bits)) * xt[j];
      }
      y[t * ldy + r] = bias != nullptr ? acc + bias[r] : acc;
    }
  }
}

// Rows [r0, r1) of the dense weight in the model's dtype (O: float, or uint16_t for bfloat16 / float16 bits), every
// entry written: exactly the weights the codes stand for.
template <typename O>
void sparse_code_rows_to_dense(const SparseCodes& w, O* out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    O* o = out + r * w.cols;
    std::memset(o, 0, sizeof(O) * static_cast<size_t>(w.cols));
    const uint8_t* p = w.codes + w.offsets[r];
    int64_t k = 0;
    each_kept(w.mask + r * w.ldm, w.ldm, [&](int64_t j) {
      const float v = code_weight(w, r, j / w.group, code_at(p, k++, w.bits));
      if constexpr (sizeof(O) == 4) {
        o[j] = v;
      } else if (w.rounding == Rounding::kFloat16) {
        o[j] = fp16_bits_exact(v);
      } else {
        o[j] = static_cast<uint16_t>(float_bits(v) >> 16);
      }
    });
  }
}

#ifdef SGK_HAVE_SPARSE_SIMD
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Per mask byte m: shift[m][i] moves the nibble of kept lane i (number index[m][i] among the chunk's kept codes) to
// the bottom of a 32-bit lane; lanes[m][i] is all ones for a kept lane, 0 otherwise.
struct CodeTable {
  alignas(32) int32_t shift[256][8];
  alignas(32) int32_t lanes[256][8];
  CodeTable() {
    const ExpandTable& e = expand_table();
    for (int m = 0; m < 256; ++m) {
      for (int i = 0; i < 8; ++i) {
        shift[m][i] = 4 * e.index[m][i];
        lanes[m][i] = (m >> i) & 1 ? -1 : 0;
      }
    }
  }
};

inline const CodeTable& code_table() {
  static const CodeTable table;
  return table;
}

template <Rounding R>
__attribute__((target("avx2,fma,f16c"))) inline __m256 round_lanes(__m256 v) {
  if constexpr (R == Rounding::kBFloat16) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i up = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    return _mm256_castsi256_ps(_mm256_and_si256(up, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  } else if constexpr (R == Rounding::kFloat16) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return v;
  }
}

// The state of one quantization group for the chunks in it: for 4-bit codes the group's 16 weights (lo: codes 0-7,
// hi: 8-15); for wider codes its zero point and scale broadcast.
template <bool kNibbles, Rounding R>
__attribute__((target("avx2,fma,f16c"))) inline void load_group(const SparseCodes& w, int64_t gi, __m256& a,
                                                                 __m256& b) {
  const __m256 s = _mm256_set1_ps(w.scale[gi]), z = _mm256_set1_ps(static_cast<float>(w.zero[gi]));
  if constexpr (kNibbles) {
    const __m256 lo = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    a = round_lanes<R>(_mm256_mul_ps(s, _mm256_sub_ps(lo, z)));
    b = round_lanes<R>(_mm256_mul_ps(s, _mm256_sub_ps(_mm256_add_ps(lo, _mm256_set1_ps(8.0f)), z)));
  } else {
    a = z;
    b = s;
  }
}

// Lane i of the result holds kept code number index[bits][i] of the chunk (the codes from number k on, of the row's
// codes at p) in its low 4 bits; the bits above are the following codes' (the lookups read only the low 4).
__attribute__((target("avx2"))) inline __m256i nibble_lanes(const uint8_t* p, int64_t k, int bits,
                                                            const CodeTable& ct) {
  uint64_t u64;
  std::memcpy(&u64, p + (k >> 1), sizeof u64);
  const auto u = static_cast<uint32_t>(u64 >> ((k & 1) * 4));
  return _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(u)),
                           _mm256_load_si256(reinterpret_cast<const __m256i*>(ct.shift[bits])));
}

// The 8 weights of one chunk (mask byte `bits`, its first kept code number k of the row's codes at p), 0 where not
// kept.
template <bool kNibbles, Rounding R>
__attribute__((target("avx2,fma,f16c"))) inline __m256 code_chunk(const uint8_t* p, int64_t k, int bits, __m256 a,
                                                                   __m256 b, const CodeTable& ct,
                                                                   const ExpandTable& et) {
  const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(ct.lanes[bits])));
  if constexpr (kNibbles) {
    const __m256i idx = nibble_lanes(p, k, bits, ct);
    const __m256 lo = _mm256_permutevar8x32_ps(a, idx), hi = _mm256_permutevar8x32_ps(b, idx);
    const __m256 v = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3: 8..15
    return _mm256_and_ps(v, keep);
  } else {
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + k)));
    const __m256i placed =
        _mm256_permutevar8x32_epi32(c, _mm256_load_si256(reinterpret_cast<const __m256i*>(et.index[bits])));
    const __m256 v = round_lanes<R>(_mm256_mul_ps(b, _mm256_sub_ps(_mm256_cvtepi32_ps(placed), a)));
    return _mm256_and_ps(v, keep);
  }
}

// The same on AVX-512VL: the 4-bit lookup is one masked two-table permutation (vpermt2ps), which also zeroes the
// lanes that are not kept.
template <bool kNibbles, Rounding R>
__attribute__((target("avx2,fma,f16c,avx512f,avx512vl"))) inline __m256 code_chunk_vl(
    const uint8_t* p, int64_t k, int bits, __m256 a, __m256 b, const CodeTable& ct, const ExpandTable& et) {
  if constexpr (kNibbles) {
    const __m256i idx = nibble_lanes(p, k, bits, ct);
    return _mm256_maskz_permutex2var_ps(static_cast<__mmask8>(bits), a, idx, b);
  } else {
    return code_chunk<kNibbles, R>(p, k, bits, a, b, ct, et);
  }
}

// Where a row's walk over its chunks stands: its codes, the next kept code's number, the current group and its state
// (load_group), and the chunks left in that group.
struct CodeWalk {
  const uint8_t* m;
  const uint8_t* p;
  int64_t k, gi, left, per_group, full;
  __m256 ga, gb;
};

// The weights of chunk C, the next one of walk s; moves on to the next group after the group's last chunk.
template <bool kNibbles, Rounding R>
__attribute__((target("avx2,fma,f16c"))) inline void next_group(const SparseCodes& w, CodeWalk& s, int64_t c) {
  if (--s.left == 0 && c + 1 < s.full) {
    load_group<kNibbles, R>(w, ++s.gi, s.ga, s.gb);
    s.left = s.per_group;
  }
}
#define SGK_NEXT_CODE_CHUNK(CHUNK, C)                                                         \
  __extension__({                                                                             \
    const int bits_ = s.m[C];                                                                 \
    const __m256 wv_ = CHUNK<kNibbles, R>(s.p, s.k, bits_, s.ga, s.gb, ct, et);               \
    s.k += _mm_popcnt_u32(static_cast<unsigned>(bits_));                                      \
    next_group<kNibbles, R>(w, s, C);                                                         \
    wv_;                                                                                      \
  })

// Up to 4 tokens of one row (group a multiple of 8 columns), the accumulators of sparse_row_avx2; CHUNK gives a
// chunk's 8 weights. Stamped out once per instruction set (a function's target is fixed, not a template argument).
#define SGK_SPARSE_CODE_ROW(NAME, TARGET, CHUNK)                                                                   \
  template <int TB, bool kNibbles, Rounding R>                                                                     \
  __attribute__((target(TARGET))) inline void NAME(const SparseCodes& w, const float* x, int64_t ldx, int64_t r,   \
                                                   float* out) {                                                   \
    constexpr int U = TB == 1 ? 4 : 2;                                                                             \
    const CodeTable& ct = code_table();                                                                            \
    const ExpandTable& et = expand_table();                                                                        \
    __m256 acc[U][TB];                                                                                             \
    for (int u = 0; u < U; ++u)                                                                                    \
      for (int t = 0; t < TB; ++t) acc[u][t] = _mm256_setzero_ps();                                                \
    CodeWalk s;                                                                                                    \
    s.m = w.mask + r * w.ldm;                                                                                      \
    s.p = w.codes + w.offsets[r];                                                                                  \
    s.k = 0;                                                                                                       \
    s.gi = r * (w.cols / w.group);                                                                                 \
    s.per_group = s.left = w.group / 8;                                                                            \
    s.full = w.cols / 8;                                                                                           \
    load_group<kNibbles, R>(w, s.gi, s.ga, s.gb);                                                                  \
    const int64_t full = s.full;                                                                                   \
    int64_t c = 0;                                                                                                 \
    for (; c + U <= full; c += U) {                                                                                \
      for (int u = 0; u < U; ++u) {                                                                                \
        const __m256 wv = SGK_NEXT_CODE_CHUNK(CHUNK, c + u);                                                       \
        const float* xc = x + (c + u) * 8;                                                                         \
        for (int t = 0; t < TB; ++t) acc[u][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xc + t * ldx), acc[u][t]);   \
      }                                                                                                            \
    }                                                                                                              \
    for (; c < full; ++c) {                                                                                        \
      const __m256 wv = SGK_NEXT_CODE_CHUNK(CHUNK, c);                                                             \
      for (int t = 0; t < TB; ++t) acc[0][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * ldx + c * 8), acc[0][t]); \
    }                                                                                                              \
    for (int t = 0; t < TB; ++t) out[t] = sum_accumulators<U>(acc, t);                                             \
  }

SGK_SPARSE_CODE_ROW(sparse_code_row_avx2, "avx2,fma,f16c,popcnt", code_chunk)
SGK_SPARSE_CODE_ROW(sparse_code_row_vl, "avx2,fma,f16c,popcnt,avx512f,avx512vl", code_chunk_vl)
#undef SGK_SPARSE_CODE_ROW
#undef SGK_NEXT_CODE_CHUNK

// 64 columns a step for codes of 4 bits or less on AVX-512 with VBMI and BITALG (groups a multiple of 64 columns, so
// a step lies in one group and a row has no partial step): the step's 8 mask bytes give every lane's rank among the
// step's kept codes at once (vpopcntb of the mask byte below the lane), the chunks' first codes follow from one
// prefix sum of the 8 byte counts, one byte permutation copies each chunk's code bytes into its 64-bit lane and one
// vpmultishiftqb moves each lane's nibble to its byte; then 16 lanes at a time are widened and looked up in the
// group's 16 weights by one masked vpermps. Against ~20 instructions per 8-column chunk in code_chunk_vl, about 50
// per 64 columns. The sums are those of sparse_code_row_avx2 lane for lane: the chunks c of the 8-lane copy go to
// accumulator c % U, and here the 16-lane accumulator A holds accumulators 0 and 1 in its halves, B (U = 4) 2 and 3,
// so every lane sees the same FMAs in the same order and the result has the same bits.
template <int TB, Rounding R>
__attribute__((target(SGK_VBMI_TARGET))) inline void sparse_code_row_vbmi(const SparseCodes& w, const float* x,
                                                                          int64_t ldx, int64_t r, float* out) {
  constexpr int U = TB == 1 ? 4 : 2;  // the 8-lane copy's accumulators: A holds 0 and 1, B 2 and 3
  const VbmiConsts& vc = vbmi_consts();
  const __m512i seq = _mm512_load_si512(vc.seq);
  const __m512i ones = _mm512_set1_epi8(1), low7 = _mm512_set1_epi8(0x7F);
  __m512 A[TB], B[TB];
  for (int t = 0; t < TB; ++t) A[t] = B[t] = _mm512_setzero_ps();
  const uint8_t* m = w.mask + r * w.ldm;
  const uint8_t* p = w.codes + w.offsets[r];
  const uint8_t* const end = w.codes + w.offsets[w.rows] + kPadCodeBytes;  // what the buffer holds
  const int64_t steps = w.cols / 64, per_group = w.group / 64;
  int64_t k = 0, gi = r * (w.cols / w.group), left = 0;
  __m512 table = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    if (left == 0) {  // the first step of a group
      __m256 lo, hi;
      load_group<true, R>(w, gi++, lo, hi);
      table = _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
      left = per_group;
    }
    --left;
    uint64_t q, starts;
    std::memcpy(&q, m + 8 * s, sizeof q);
    const __m512i rank = step_ranks(q, vc, &starts);
    // byte 8i + j: the nibble at which chunk i's codes start, counted from the window's first byte (at most 57)
    const __m512i st = bytes_to_lanes(starts + static_cast<uint64_t>(k & 1) * 0x0101010101010101ull, vc);
    const __m512i idx = _mm512_add_epi8(_mm512_and_si512(_mm512_srli_epi16(st, 1), low7), seq);
    const __m512i odd = _mm512_slli_epi16(_mm512_and_si512(st, ones), 2);  // 4 bits more for an odd start
    const __m512i ctl = _mm512_add_epi8(_mm512_slli_epi16(rank, 2), odd);  // bit offset of each lane's nibble
    const int total = static_cast<int>(_mm_popcnt_u64(q));
    const auto nbytes = static_cast<unsigned>(((k & 1) + total + 1) >> 1);  // at most 33
    const uint8_t* const at = p + (k >> 1);
    // a plain load where the buffer holds 64 bytes from here (masked loads measured 1.6x slower from memory)
    const __m512i win = at + 64 <= end ? _mm512_loadu_si512(at) : _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, nbytes), at);
    const __m512i nib = _mm512_multishift_epi64_epi8(ctl, _mm512_permutexvar_epi8(idx, win));
    k += total;
    vbmi_step_fma<TB, U>(
        [&](auto qd) __attribute__((target(SGK_VBMI_TARGET))) {
          constexpr int QD = decltype(qd)::value;
          const __m512i ci = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(nib, QD));
          return _mm512_maskz_permutexvar_ps(static_cast<__mmask16>(q >> (16 * QD)), ci, table);
        },
        x + 64 * s, ldx, A, B);
  }
  __m256 acc[U][TB];  // the halves of A and B are sparse_code_row_avx2's accumulators, summed as it sums them
  vbmi_hand_over<TB, U>(A, B, acc);
  for (int t = 0; t < TB; ++t) out[t] = sum_accumulators<U>(acc, t);
}

template <Rounding R>
inline void sparse_code_rows_vbmi(const SparseCodes& w, const float* x, int64_t T, int64_t ldx, const float* bias,
                                  float* y, int64_t ldy, int64_t r0, int64_t r1) {
  by_token_groups<4>(x, T, ldx, bias, y, ldy, r0, r1, [&](const float* xt, int64_t tb, int64_t r, float* out) {
    switch (tb) {  // from 3 tokens on the 8-column chunks measured faster (benchmarks/RESULTS.md); same sums
      case 1: return sparse_code_row_vbmi<1, R>(w, xt, ldx, r, out);
      case 2: return sparse_code_row_vbmi<2, R>(w, xt, ldx, r, out);
      case 3: return sparse_code_row_vl<3, true, R>(w, xt, ldx, r, out);
      default: return sparse_code_row_vl<4, true, R>(w, xt, ldx, r, out);
    }
  });
}

template <bool kVl, bool kNibbles, Rounding R>
inline void sparse_code_rows_simd(const SparseCodes& w, const float* x, int64_t T, int64_t ldx, const float* bias,
                                  float* y, int64_t ldy, int64_t r0, int64_t r1) {
  by_token_groups<4>(x, T, ldx, bias, y, ldy, r0, r1, [&](const float* xt, int64_t tb, int64_t r, float* out) {
    if constexpr (kVl) {
      switch (tb) {
        case 1: return sparse_code_row_vl<1, kNibbles, R>(w, xt, ldx, r, out);
        case 2: return sparse_code_row_vl<2, kNibbles, R>(w, xt, ldx, r, out);
        case 3: return sparse_code_row_vl<3, kNibbles, R>(w, xt, ldx, r, out);
        default: return sparse_code_row_vl<4, kNibbles, R>(w, xt, ldx, r, out);
      }
    } else {
      switch (tb) {
        case 1: return sparse_code_row_avx2<1, kNibbles, R>(w, xt, ldx, r, out);
        case 2: return sparse_code_row_avx2<2, kNibbles, R>(w, xt, ldx, r, out);
        case 3: return sparse_code_row_avx2<3, kNibbles, R>(w, xt, ldx, r, out);
        default: return sparse_code_row_avx2<4, kNibbles, R>(w, xt, ldx, r, out);
      }
    }
  });
}

template <bool kVl, bool kNibbles>
inline void sparse_code_rows_simd(const SparseCodes& w, const float* x, int64_t T, int64_t ldx, const float* bias,
                                  float* y, int64_t ldy, int64_t r0, int64_t r1) {
  if (kVl && kNibbles && w.group % 64 == 0 && cpu_has_vbmi()) {
    switch (w.rounding) {
      case Rounding::kBFloat16: return sparse_code_rows_vbmi<Rounding::kBFloat16>(w, x, T, ldx, bias, y, ldy, r0, r1);
      case Rounding::kFloat16: return sparse_code_rows_vbmi<Rounding::kFloat16>(w, x, T, ldx, bias, y, ldy, r0, r1);
      default: return sparse_code_rows_vbmi<Rounding::kFloat32>(w, x, T, ldx, bias, y, ldy, r0, r1);
    }
  }
  switch (w.rounding) {
    case Rounding::kBFloat16:
      return sparse_code_rows_simd<kVl, kNibbles, Rounding::kBFloat16>(w, x, T, ldx, bias, y, ldy, r0, r1);
    case Rounding::kFloat16:
      return sparse_code_rows_simd<kVl, kNibbles, Rounding::kFloat16>(w, x, T, ldx, bias, y, ldy, r0, r1);
    default:
      return sparse_code_rows_simd<kVl, kNibbles, Rounding::kFloat32>(w, x, T, ldx, bias, y, ldy, r0, r1);
  }
}
#define SGK_CODES_BF16_TARGET \
  "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vbmi2,avx512bf16,avx2,fma,f16c,popcnt,bmi2"

// Whether this CPU has what sparse_code_row_bf16 uses: the bfloat16 dot products, VBMI and VBMI2.
inline bool cpu_has_codes_bf16_dot() {
  static const bool has = cpu_has_bf16_dot() && cpu_has_vbmi() && __builtin_cpu_supports("avx512vbmi2");
  return has;
}

// Up to 8 tokens of one row of codes of 4 bits or less (a bfloat16 model; groups a multiple of 32 columns, so a
// step lies in one group) against bfloat16 x, 32 columns a step on the bfloat16 dot products: the window of code
// bytes the step's codes lie in is widened to one nibble a byte (in order), moved down one nibble when the step
// starts on a high nibble, expanded into the kept columns (vpexpandb), widened to words and looked up in the
// group's 16 weights as bfloat16 words (vpermw, 0 where not kept). Those are the words sparse_row_bf16 expands from
// the dequantized values, and the dot products and sums are its own, so the two agree bit for bit.
template <int TB>
__attribute__((target(SGK_CODES_BF16_TARGET), flatten)) inline void sparse_code_row_bf16(
    const SparseCodes& w, const uint16_t* x, int64_t ldx, int64_t r, float* out) {
  const VbmiConsts& vc = vbmi_consts();
  const __m512i seq = _mm512_load_si512(vc.seq);  // byte i: i % 8; with bcast, i below
  const __m512i iota = _mm512_add_epi8(seq, _mm512_slli_epi64(_mm512_load_si512(vc.bcast), 3));  // byte i: i
  const __m512i low4 = _mm512_set1_epi16(0x000F), high4 = _mm512_set1_epi16(0x00F0);
  constexpr int U = kDotChains<TB>;
  __m512 acc[U][TB];
  zero_dot_chains(acc);
  const uint8_t* m = w.mask + r * w.ldm;
  const uint8_t* p = w.codes + w.offsets[r];
  const uint8_t* const end = w.codes + w.offsets[w.rows] + kPadCodeBytes;  // what the buffer holds
  const int64_t steps = w.cols / 32, per_group = w.group / 32;
  int64_t k = 0, gi = r * (w.cols / w.group), left = 0;
  __m512i table = _mm512_setzero_si512();
  for_dot_chains<U>(steps, [&](int u, int64_t s) __attribute__((target(SGK_CODES_BF16_TARGET))) {
    if (left == 0) {  // the first step of a group: its 16 weights (exact bfloat16 values) as words
      __m256 lo, hi;
      load_group<true, Rounding::kBFloat16>(w, gi++, lo, hi);
      const __m512i f = _mm512_castps_si512(_mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1));
      table = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_srli_epi32(f, 16)));
      left = per_group;
    }
    --left;
    uint32_t q;
    std::memcpy(&q, m + 4 * s, sizeof q);
    const int total = _mm_popcnt_u32(q);
    const auto nbytes = static_cast<unsigned>(((k & 1) + total + 1) >> 1);  // at most 17
    const uint8_t* const at = p + (k >> 1);
    // a plain load where the buffer holds 32 bytes from here (masked loads measured slower from memory)
    const __m256i win = at + 32 <= end ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at))
                                       : _mm256_maskz_loadu_epi8(_bzhi_u32(~0u, nbytes), at);
    const __m512i wd = _mm512_cvtepu8_epi16(win);  // word i: code byte i
    const __m512i nib = _mm512_or_si512(_mm512_and_si512(wd, low4), _mm512_slli_epi16(_mm512_and_si512(wd, high4), 4));
    // byte i: the step's code i (one byte down when the step starts on a high nibble; without a branch, which would
    // be taken at random)
    const __m512i from = _mm512_permutexvar_epi8(_mm512_add_epi8(iota, _mm512_set1_epi8(static_cast<char>(k & 1))), nib);
    const __m512i placed = _mm512_maskz_expand_epi8(static_cast<__mmask64>(q), from);  // byte j: column j's code
    const __m512i idx = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(placed));
    const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_maskz_permutexvar_epi16(static_cast<__mmask32>(q), idx,
                                                                                  table));
    k += total;
    dot_tokens<TB>(acc[u], wv, x + 32 * s, ldx);
  });
  sum_dot_chains<U, TB>(acc, out);
}

// The byte constants of sparse_code_row_bf16_64, for a step whose first code is a low (o = 0) or a high (o = 1)
// nibble of its first byte: byte j of idx[o] is the window byte that holds the step's code j, (j + o) / 2; byte i of
// each qword of shift[o] the bit offset of that nibble within its qword after the byte permutation, 8i + 4((i + o) % 2)
// (vpmultishiftqb then leaves the code in the byte's low 4 bits; the 4 above belong to the next code).
struct NibbleConsts {
  alignas(64) uint8_t idx[2][64];
  alignas(64) uint8_t shift[2][64];
  NibbleConsts() {
    for (int o = 0; o < 2; ++o) {
      for (int j = 0; j < 64; ++j) {
        idx[o][j] = static_cast<uint8_t>((j + o) / 2);
        shift[o][j] = static_cast<uint8_t>(8 * (j % 8) + 4 * ((j + o) % 2));
      }
    }
  }
};

inline const NibbleConsts& nibble_consts() {
  static const NibbleConsts c;
  return c;
}

// The bfloat16 words of one row of codes of 4 bits or less (a bfloat16 model; groups a multiple of 64 columns, so a
// step lies in one group), 64 columns a step, in order: the step's (up to 64) codes unpacked to one a byte by one byte
// permutation and one vpmultishiftqb from the (up to 33) bytes they lie in, expanded into the 64 columns at once
// (vpexpandb), doubled, then per 32 columns widened to words and looked up in the group's 16 weights (vpermw on a
// table whose dword c holds code c's weight in its low word, built in float32 lanes once per group: index 2c, the
// bits above the fifth, left over from the next code, ignored by vpermw; 0 where not kept). About 9 byte-lane
// instructions per 64 columns against 14 for two 32-column steps of sparse_code_row_bf16, with the same words.
// `end`: the end of the code bytes the buffer holds (loads that would pass it are masked to the step's bytes).
struct CodeWords64 {
  const SparseCodes& w;
  const NibbleConsts& nc = nibble_consts();
  const uint8_t* m;
  const uint8_t* p;
  const uint8_t* end;
  int64_t k = 0, gi, left = 0;
  const int64_t per_group;
  __m512i table;
  __m512 iota;

  __attribute__((target(SGK_CODES_BF16_TARGET))) CodeWords64(const SparseCodes& w_, int64_t r, const uint8_t* end_)
      : w(w_), m(w_.mask + r * w_.ldm), p(w_.codes + w_.offsets[r]), end(end_), gi(r * (w_.cols / w_.group)),
        per_group(w_.group / 64), table(_mm512_setzero_si512()),
        iota(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)) {}

  // The words of columns 64s .. 64s + 31 (w0) and 64s + 32 .. 64s + 63 (w1); steps are taken in order.
  __attribute__((target(SGK_CODES_BF16_TARGET))) void step(int64_t s, __m512i& w0, __m512i& w1) {
    if (left == 0) {  // the first step of a group: dword c holds code c's weight as bfloat16 bits (load_group's)
      const __m512 f = _mm512_mul_ps(_mm512_set1_ps(w.scale[gi]),
                                     _mm512_sub_ps(iota, _mm512_set1_ps(static_cast<float>(w.zero[gi]))));
      ++gi;
      const __m512i u = _mm512_castps_si512(f);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      table = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
      left = per_group;
    }
    --left;
    uint64_t q;
    std::memcpy(&q, m + 8 * s, sizeof q);
    const int total = static_cast<int>(_mm_popcnt_u64(q));
    const int o = static_cast<int>(k & 1);
    const auto nbytes = static_cast<unsigned>((o + total + 1) >> 1);  // at most 33
    const uint8_t* const at = p + (k >> 1);
    // a plain load where the buffer holds 64 bytes from here (masked loads measured slower from memory)
    const __m512i win = at + 64 <= end ? _mm512_loadu_si512(at) : _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, nbytes), at);
    const __m512i codes = _mm512_multishift_epi64_epi8(
        _mm512_load_si512(nc.shift[o]), _mm512_permutexvar_epi8(_mm512_load_si512(nc.idx[o]), win));
    const __m512i placed = _mm512_maskz_expand_epi8(static_cast<__mmask64>(q), codes);  // byte j: column j's code
    const __m512i twice = _mm512_add_epi8(placed, placed);  // the word of code c in the table is 2c
    k += total;
    w0 = _mm512_maskz_permutexvar_epi16(static_cast<__mmask32>(q), _mm512_cvtepu8_epi16(_mm512_castsi512_si256(twice)),
                                        table);
    w1 = _mm512_maskz_permutexvar_epi16(static_cast<__mmask32>(q >> 32),
                                        _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(twice, 1)), table);
  }
};

// sparse_code_row_bf16 64 columns a step (CodeWords64): the same words into the same chains (32-column step 2s + h
// into chain (2s + h) % U), so the same bits.
template <int TB>
__attribute__((target(SGK_CODES_BF16_TARGET), flatten)) inline void sparse_code_row_bf16_64(
    const SparseCodes& w, const uint16_t* x, int64_t ldx, int64_t r, float* out) {
  constexpr int U = kDotChains<TB>;
  static_assert(U == 1 || U % 2 == 0, "a 64-column step feeds two chains");
  __m512 acc[U][TB];
  zero_dot_chains(acc);
  CodeWords64 words(w, r, w.codes + w.offsets[w.rows] + kPadCodeBytes);
  constexpr int kSteps = U == 1 ? 1 : U / 2;  // 64-column steps per round of the chains
  // step s (64 columns, i = s % kSteps) into chains h0 = 2i and h0 + 1 (both 0 when U = 1)
  for_dot_chains<kSteps>(w.cols / 64, [&](int i, int64_t s) __attribute__((target(SGK_CODES_BF16_TARGET))) {
    __m512i w0, w1;
    words.step(s, w0, w1);
    const int h0 = U == 1 ? 0 : 2 * i, h1 = U == 1 ? 0 : h0 + 1;
    dot_tokens<TB>(acc[h0], reinterpret_cast<__m512bh>(w0), x + 64 * s, ldx);
    dot_tokens<TB>(acc[h1], reinterpret_cast<__m512bh>(w1), x + 64 * s + 32, ldx);
  });
  sum_dot_chains<U, TB>(acc, out);
}

// Rows [r0, r1) of the dense bfloat16 weight (sparse_code_rows_to_dense's bits): CodeWords64's words stored.
// `end`: the end of the code bytes the buffer holds.
__attribute__((target(SGK_CODES_BF16_TARGET), flatten)) inline void sparse_code_rows_to_dense_bf16_64(
    const SparseCodes& w, const uint8_t* end, uint16_t* out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    CodeWords64 words(w, r, end);
    uint16_t* o = out + r * w.cols;
    for (int64_t s = 0; s < w.cols / 64; ++s) {
      __m512i w0, w1;
      words.step(s, w0, w1);
      _mm512_storeu_si512(o + 64 * s, w0);
      _mm512_storeu_si512(o + 64 * s + 32, w1);
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

// Whether the SIMD copy takes this weight under `simd` (else sparse_code_rows runs the scalar loop).
inline bool code_simd_takes(Simd simd, const SparseCodes& w) {
#ifdef SGK_HAVE_SPARSE_SIMD
  static const bool f16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
  return simd != Simd::kBaseline && f16c && w.group % 8 == 0;
#else
  (void)simd, (void)w;
  return false;
#endif
}

// Whether sparse_code_rows_bf16 takes this weight on this CPU: codes of 4 bits or less of a bfloat16 model in
// groups of a multiple of 32 columns, the bfloat16 dot products, VBMI and VBMI2.
inline bool code_bf16_dot_takes(Simd simd, const SparseCodes& w) {
#ifdef SGK_HAVE_SPARSE_SIMD
  return simd == Simd::kAvx512 && w.bits <= 4 && w.rounding == Rounding::kBFloat16 && w.group % 32 == 0 &&
         cpu_has_codes_bf16_dot();
#else
  (void)simd, (void)w;
  return false;
#endif
}

// sparse_code_rows_to_dense into bfloat16 (rounding kBFloat16), 64 columns a step where code_bf16_dot_takes the
// weight and its groups are a multiple of 64 columns, else one kept code at a time; the same bits. The codes buffer
// holds offsets[rows] bytes.
inline void sparse_code_rows_to_dense(Simd simd, const SparseCodes& w, uint16_t* out, int64_t r0, int64_t r1) {
#ifdef SGK_HAVE_SPARSE_SIMD
  if (code_bf16_dot_takes(simd, w) && w.group % 64 == 0) {
    return sparse_code_rows_to_dense_bf16_64(w, w.codes + w.offsets[w.rows], out, r0, r1);
  }
#endif
  (void)simd;
  sparse_code_rows_to_dense(w, out, r0, r1);
}

// Rows [r0, r1) for T tokens of bfloat16 x (leading dimension ldx) on the bfloat16 dot products (callers check
// code_bf16_dot_takes); tokens go in groups of up to 8. Groups of a multiple of 64 columns take the 64-column steps
// unless allow_64 is false (the tests compare the two: the same bits).
inline void sparse_code_rows_bf16(const SparseCodes& w, const uint16_t* x, int64_t T, int64_t ldx, const float* bias,
                                  float* y, int64_t ldy, int64_t r0, int64_t r1, bool allow_64 = true) {
#ifdef SGK_HAVE_SPARSE_SIMD
  by_token_groups<8>(x, T, ldx, bias, y, ldy, r0, r1, [&](const uint16_t* xt, int64_t tb, int64_t r, float* out) {
    with_token_count<8>(tb, [&](auto TB) {
      if (w.group % 64 == 0 && allow_64) return sparse_code_row_bf16_64<decltype(TB)::value>(w, xt, ldx, r, out);
      sparse_code_row_bf16<decltype(TB)::value>(w, xt, ldx, r, out);
    });
  });
#else
  (void)w, (void)x, (void)T, (void)ldx, (void)bias, (void)y, (void)ldy, (void)r0, (void)r1, (void)allow_64;
#endif
}

// Rows [r0, r1) for T tokens with the SIMD copy where it takes the weight, else one kept weight at a time.
inline void sparse_code_rows(Simd simd, const SparseCodes& w, const float* x, int64_t T, int64_t ldx,
                             const float* bias, float* y, int64_t ldy, int64_t r0, int64_t r1) {
#ifdef SGK_HAVE_SPARSE_SIMD
  if (code_simd_takes(simd, w)) {
    // 8-bit codes have no lookup to shorten: the AVX2 copy serves both instruction sets
    if (w.bits > 4) return sparse_code_rows_simd<false, false>(w, x, T, ldx, bias, y, ldy, r0, r1);
    if (simd == Simd::kAvx512) return sparse_code_rows_simd<true, true>(w, x, T, ldx, bias, y, ldy, r0, r1);
    return sparse_code_rows_simd<false, true>(w, x, T, ldx, bias, y, ldy, r0, r1);
  }
#endif
  sparse_code_rows_scalar(w, x, T, ldx, bias, y, ldy, r0, r1);
}

}  // namespace sgk
