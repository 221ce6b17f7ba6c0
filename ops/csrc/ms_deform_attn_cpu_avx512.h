// AVX-512 inner loops of the CPU kernels of multi-scale deformable attention (CPU only), for float32 rows of
// D = 16 k channels and bfloat16 rows of D = 32 k channels; everything else runs the portable loops of
// ms_deform_attn_cpu.cpp. Compiled when the build targets AVX-512 (ops/build.py passes -mavx512f ... where torch
// reports AVX512); the native bfloat16 instructions (AVX512_BF16: dot products of bfloat16 pairs, float32 to
// bfloat16 conversion) also need -mavx512bf16 (where torch reports them) and are used only when asked (kNative).
//
// A bfloat16 is the upper half of a float32: a 32-bit lane holding channels 2k (low half) and 2k + 1 (high half)
// gives channel 2k + 1 as a float32 by clearing the low half, and channel 2k by shifting it up. The bfloat16 loops
// work on these even and odd channels and restore the channel order when they store.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define DETR_MSDA_HAVE_AVX512 1
#include <immintrin.h>

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace deformable_detr {
namespace avx512 {

#if defined(__AVX512BF16__)
constexpr bool kHasNativeBfloat16 = true;
#else
constexpr bool kHasNativeBfloat16 = false;
#endif

inline __m512 even_channels(__m512i pairs) { return _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)); }

inline __m512 odd_channels(__m512i pairs) {
  return _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}

// The 16 channels of a bfloat16 row at `row` as float32, in order.
inline __m512 load_bfloat16(const c10::BFloat16* row) {
  const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}

// float32 rounded to the nearest bfloat16 (ties to even, NaN to a quiet NaN, as c10::BFloat16), in the upper half
// of each lane; the lower half is garbage.
inline __m512i round_to_bfloat16(__m512 values) {
  const __m512i bits = _mm512_castps_si512(values);
  const __m512i lowest_kept = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lowest_kept, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
}

// Stores 16 float32 as bfloat16 at `out`.
template <bool kNative>
inline void store_bfloat16(c10::BFloat16* out, __m512 values) {
  __m256i packed;
#if defined(__AVX512BF16__)
  if constexpr (kNative) {
    packed = (__m256i)_mm512_cvtneps_pbh(values);
  } else
#endif
  {
    packed = _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_to_bfloat16(values), 16));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), packed);
}

// Stores even and odd channels (16 each) as 32 bfloat16 in channel order at `out`.
template <bool kNative>
inline void store_bfloat16_pairs(c10::BFloat16* out, __m512 even, __m512 odd) {
  __m512i pairs;
#if defined(__AVX512BF16__)
  if constexpr (kNative) {
    // lanes 0-15 hold the even channels, 16-31 the odd ones: interleave them
    const __m512i converted = (__m512i)_mm512_cvtne2ps_pbh(odd, even);
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                           21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    pairs = _mm512_permutexvar_epi16(order, converted);
  } else
#endif
  {
    const __m512i high = _mm512_and_si512(round_to_bfloat16(odd), _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u)));
    pairs = _mm512_or_si512(high, _mm512_srli_epi32(round_to_bfloat16(even), 16));
  }
  _mm512_storeu_si512(out, pairs);
}

// Lane 4 c + s of the result is the sum of the 16 lanes of partial[4 s + c] (s, c in 0..3): a transposing
// reduction, 45 operations for 16 sums where one horizontal sum alone takes 8.
inline __m512 sum_lanes_of_16(const __m512 partial[16]) {
  __m512 halves[8], quarters[4];
  for (int k = 0; k < 8; ++k) {  // 256-bit halves of partial[2k] and partial[2k+1] added: 8 lanes each
    const __m512 a = partial[2 * k], b = partial[2 * k + 1];
    halves[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int k = 0; k < 4; ++k) {  // quarter j of quarters[k] holds 4 partial sums of partial[4k + j]
    const __m512 a = halves[2 * k], b = halves[2 * k + 1];
    quarters[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  const __m512 pair01 = _mm512_add_ps(_mm512_unpacklo_ps(quarters[0], quarters[1]),
                                      _mm512_unpackhi_ps(quarters[0], quarters[1]));
  const __m512 pair23 = _mm512_add_ps(_mm512_unpacklo_ps(quarters[2], quarters[3]),
                                      _mm512_unpackhi_ps(quarters[2], quarters[3]));
  const __m512d low = _mm512_unpacklo_pd(_mm512_castps_pd(pair01), _mm512_castps_pd(pair23));
  const __m512d high = _mm512_unpackhi_pd(_mm512_castps_pd(pair01), _mm512_castps_pd(pair23));
  return _mm512_add_ps(_mm512_castpd_ps(low), _mm512_castpd_ps(high));
}

// Forward of one (query, head): out = sum over samples [begin, end) and corners c of weight[c][i] * rows[c][i].
// One accumulator per corner and vector keeps four independent chains of fused multiply-adds in flight.
template <int kChannels>
inline void forward_head(const float* const* const rows[4], const float* const weight[4], int64_t begin,
                         int64_t end, float* out, bool /*native*/) {
  constexpr int kVectors = kChannels / 16;
  __m512 sum[4][kVectors];
  for (auto& corner : sum)
    for (auto& vector : corner) vector = _mm512_setzero_ps();
  for (int64_t i = begin; i < end; ++i) {
    // unrolled, so that the accumulators stay in registers (indexed by a loop variable they were kept on the stack)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const float* row = rows[c][i];
      const __m512 w = _mm512_set1_ps(weight[c][i]);
#pragma GCC unroll 8
      for (int k = 0; k < kVectors; ++k) sum[c][k] = _mm512_fmadd_ps(w, _mm512_loadu_ps(row + 16 * k), sum[c][k]);
    }
  }
  for (int k = 0; k < kVectors; ++k) {
    _mm512_storeu_ps(out + 16 * k,
                     _mm512_add_ps(_mm512_add_ps(sum[0][k], sum[1][k]), _mm512_add_ps(sum[2][k], sum[3][k])));
  }
}

template <int kChannels>
inline void forward_head(const c10::BFloat16* const* const rows[4], const float* const weight[4], int64_t begin,
                         int64_t end, c10::BFloat16* out, bool native) {
  constexpr int kVectors = kChannels / 32;
  __m512 even[4][kVectors], odd[4][kVectors];
  for (int c = 0; c < 4; ++c) {
    for (int k = 0; k < kVectors; ++k) even[c][k] = odd[c][k] = _mm512_setzero_ps();
  }
  for (int64_t i = begin; i < end; ++i) {
#pragma GCC unroll 4  // the accumulators stay in registers (see the float32 forward_head)
    for (int c = 0; c < 4; ++c) {
      const c10::BFloat16* row = rows[c][i];
      const __m512 w = _mm512_set1_ps(weight[c][i]);
#pragma GCC unroll 8
      for (int k = 0; k < kVectors; ++k) {
        const __m512i pairs = _mm512_loadu_si512(row + 32 * k);
        even[c][k] = _mm512_fmadd_ps(w, even_channels(pairs), even[c][k]);
        odd[c][k] = _mm512_fmadd_ps(w, odd_channels(pairs), odd[c][k]);
      }
    }
  }
  for (int k = 0; k < kVectors; ++k) {
    const __m512 e = _mm512_add_ps(_mm512_add_ps(even[0][k], even[1][k]), _mm512_add_ps(even[2][k], even[3][k]));
    const __m512 o = _mm512_add_ps(_mm512_add_ps(odd[0][k], odd[1][k]), _mm512_add_ps(odd[2][k], odd[3][k]));
    if (kHasNativeBfloat16 && native) {
      store_bfloat16_pairs<true>(out + 32 * k, e, o);
    } else {
      store_bfloat16_pairs<false>(out + 32 * k, e, o);
    }
  }
}

// The gradient row of one (query, head) as float32 vectors in the layouts the backward needs.
template <typename scalar_t, int kChannels>
struct GradRow;

template <int kChannels>
struct GradRow<float, kChannels> {
  static constexpr int kVectors = kChannels / 16;
  __m512 in_order[kVectors];

  explicit GradRow(const float* row) {
    for (int k = 0; k < kVectors; ++k) in_order[k] = _mm512_loadu_ps(row + 16 * k);
  }
  // 16 lanes whose sum is <grad, value row>
  template <bool kNative>
  __m512 dot(const float* value_row) const {
    __m512 partial = _mm512_mul_ps(_mm512_loadu_ps(value_row), in_order[0]);
    for (int k = 1; k < kVectors; ++k) partial = _mm512_fmadd_ps(_mm512_loadu_ps(value_row + 16 * k), in_order[k], partial);
    return partial;
  }
};

template <int kChannels>
struct GradRow<c10::BFloat16, kChannels> {
  static constexpr int kVectors = kChannels / 16;
  __m512 in_order[kVectors];       // for the scatter into the float32 gradient rows
  __m512 even[kVectors / 2], odd[kVectors / 2];
  __m512i pairs[kVectors / 2];     // the row as stored, for the native dot products

  explicit GradRow(const c10::BFloat16* row) {
    for (int k = 0; k < kVectors; ++k) in_order[k] = load_bfloat16(row + 16 * k);
    for (int k = 0; k < kVectors / 2; ++k) {
      pairs[k] = _mm512_loadu_si512(row + 32 * k);
      even[k] = even_channels(pairs[k]);
      odd[k] = odd_channels(pairs[k]);
    }
  }
  template <bool kNative>
  __m512 dot(const c10::BFloat16* value_row) const {
    __m512 partial = _mm512_setzero_ps();
    for (int k = 0; k < kVectors / 2; ++k) {
      const __m512i values = _mm512_loadu_si512(value_row + 32 * k);
#if defined(__AVX512BF16__)
      if constexpr (kNative) {
        partial = _mm512_dpbf16_ps(partial, (__m512bh)values, (__m512bh)pairs[k]);
        continue;
      }
#endif
      partial = _mm512_fmadd_ps(even_channels(values), even[k], partial);
      partial = _mm512_fmadd_ps(odd_channels(values), odd[k], partial);
    }
    return partial;
  }
};

// Backward of one (query, head), samples [0, count): adds scaled[c][i] * grad into the float32 gradient rows
// grad_rows[c][i] (kGradValue) and writes dots[c][i] = <grad, value_rows[c][i]> (kGradSampling; the dots arrays
// hold count rounded up to a multiple of 4). Corners outside the map all point at one row, so every corner's
// gradient row is read and written before the next one's.
template <bool kNative, bool kGradValue, bool kGradSampling, typename scalar_t, int kChannels>
inline void backward_head(const GradRow<scalar_t, kChannels>& grad, const scalar_t* const* const value_rows[4],
                          float* const* const grad_rows[4], const float* const scaled[4], int64_t count,
                          float* const dots[4]) {
  constexpr int kVectors = kChannels / 16;
  for (int64_t first = 0; first < count; first += 4) {
    __m512 partial[16];
    for (int s = 0; s < 4; ++s) {
      const int64_t i = first + s;
      for (int c = 0; c < 4; ++c) {
        if (i >= count) {
          partial[4 * s + c] = _mm512_setzero_ps();
          continue;
        }
        if constexpr (kGradValue) {
          float* row = grad_rows[c][i];
          const __m512 w = _mm512_set1_ps(scaled[c][i]);
          for (int k = 0; k < kVectors; ++k) {
            _mm512_storeu_ps(row + 16 * k, _mm512_fmadd_ps(w, grad.in_order[k], _mm512_loadu_ps(row + 16 * k)));
          }
        }
        if constexpr (kGradSampling) partial[4 * s + c] = grad.template dot<kNative>(value_rows[c][i]);
      }
    }
    if constexpr (kGradSampling) {
      const __m512 sums = sum_lanes_of_16(partial);
      _mm_storeu_ps(dots[0] + first, _mm512_castps512_ps128(sums));
      _mm_storeu_ps(dots[1] + first, _mm512_extractf32x4_ps(sums, 1));
      _mm_storeu_ps(dots[2] + first, _mm512_extractf32x4_ps(sums, 2));
      _mm_storeu_ps(dots[3] + first, _mm512_extractf32x4_ps(sums, 3));
    }
  }
}

}  // namespace avx512
}  // namespace deformable_detr

#endif  // __AVX512F__ && __AVX512BW__
