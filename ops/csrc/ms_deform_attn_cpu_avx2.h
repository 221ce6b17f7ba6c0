// AVX2 inner loops of the CPU kernels of multi-scale deformable attention (CPU only), for float32 rows of
// D = 8 k channels and bfloat16 rows of D = 16 k channels: the same loops as ms_deform_attn_cpu_avx512.h at half the
// width, for CPUs without AVX-512 (AMD before Zen 4, Intel client cores). Compiled when the build targets AVX2 and
// FMA (ops/build.py passes -mavx2 -mfma where torch reports AVX2 or AVX512).
//
// bfloat16 as in the AVX-512 loops: a 32-bit lane holding channels 2k (low half) and 2k + 1 (high half) gives
// channel 2k + 1 as a float32 by clearing the low half and channel 2k by shifting it up; the loops work on these
// even and odd channels and restore the channel order when they store.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#define DETR_MSDA_HAVE_AVX2 1
#include <immintrin.h>

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace deformable_detr {
namespace avx2 {

inline __m256 even_channels(__m256i pairs) { return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)); }

inline __m256 odd_channels(__m256i pairs) {
  return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}

// The 8 channels of a bfloat16 row at `row` as float32, in order.
inline __m256 load_bfloat16(const c10::BFloat16* row) {
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}

// float32 rounded to the nearest bfloat16 (ties to even, NaN to a quiet NaN, as c10::BFloat16), in the upper half
// of each lane; the lower half is garbage.
inline __m256i round_to_bfloat16(__m256 values) {
  const __m256i bits = _mm256_castps_si256(values);
  const __m256i lowest_kept = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lowest_kept, _mm256_set1_epi32(0x7FFF)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(values, values, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC00000), nan);
}

// Stores 8 float32 as bfloat16 at `out`.
inline void store_bfloat16(c10::BFloat16* out, __m256 values) {
  const __m256i halves = _mm256_srli_epi32(round_to_bfloat16(values), 16);  // 0 .. 0xFFFF: packs exactly
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(halves, halves), _MM_SHUFFLE(3, 1, 2, 0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
}

// Stores even and odd channels (8 each) as 16 bfloat16 in channel order at `out`.
inline void store_bfloat16_pairs(c10::BFloat16* out, __m256 even, __m256 odd) {
  const __m256i high =
      _mm256_and_si256(round_to_bfloat16(odd), _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u)));
  const __m256i pairs = _mm256_or_si256(high, _mm256_srli_epi32(round_to_bfloat16(even), 16));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), pairs);
}

// Lane k of the result is the sum of the 8 lanes of partial[k].
inline __m256 sum_lanes_of_8(const __m256 partial[8]) {
  const __m256 pairs01 = _mm256_hadd_ps(partial[0], partial[1]), pairs23 = _mm256_hadd_ps(partial[2], partial[3]);
  const __m256 pairs45 = _mm256_hadd_ps(partial[4], partial[5]), pairs67 = _mm256_hadd_ps(partial[6], partial[7]);
  // each 128-bit half: the sums of four lanes of partial[0..3] (low) and of partial[4..7] (high)
  const __m256 quads0123 = _mm256_hadd_ps(pairs01, pairs23), quads4567 = _mm256_hadd_ps(pairs45, pairs67);
  return _mm256_add_ps(_mm256_permute2f128_ps(quads0123, quads4567, 0x20),
                       _mm256_permute2f128_ps(quads0123, quads4567, 0x31));
}

// Forward of one (query, head): out = sum over samples [begin, end) and corners c of weight[c][i] * rows[c][i].
// Two accumulators per vector (corners 0-1 and 2-3): 2 * D / 8 independent chains of fused multiply-adds, all in
// registers (four per vector, as the AVX-512 loops keep, would not fit in AVX2's 16).
template <int kChannels>
inline void forward_head(const float* const* const rows[4], const float* const weight[4], int64_t begin,
                         int64_t end, float* out) {
  constexpr int kVectors = kChannels / 8;
  __m256 sum[2][kVectors];
  for (auto& pair : sum)
    for (auto& vector : pair) vector = _mm256_setzero_ps();
  for (int64_t i = begin; i < end; ++i) {
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const float* row = rows[c][i];
      const __m256 w = _mm256_set1_ps(weight[c][i]);
#pragma GCC unroll 8
      for (int k = 0; k < kVectors; ++k) {
        sum[c / 2][k] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 8 * k), sum[c / 2][k]);
      }
    }
  }
  for (int k = 0; k < kVectors; ++k) _mm256_storeu_ps(out + 8 * k, _mm256_add_ps(sum[0][k], sum[1][k]));
}

template <int kChannels>
inline void forward_head(const c10::BFloat16* const* const rows[4], const float* const weight[4], int64_t begin,
                         int64_t end, c10::BFloat16* out) {
  constexpr int kVectors = kChannels / 16;
  __m256 even[2][kVectors], odd[2][kVectors];  // corners 0-1 and 2-3, as the float32 forward_head
  for (int pair = 0; pair < 2; ++pair) {
    for (int k = 0; k < kVectors; ++k) even[pair][k] = odd[pair][k] = _mm256_setzero_ps();
  }
  for (int64_t i = begin; i < end; ++i) {
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const c10::BFloat16* row = rows[c][i];
      const __m256 w = _mm256_set1_ps(weight[c][i]);
#pragma GCC unroll 8
      for (int k = 0; k < kVectors; ++k) {
        const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * k));
        even[c / 2][k] = _mm256_fmadd_ps(w, even_channels(pairs), even[c / 2][k]);
        odd[c / 2][k] = _mm256_fmadd_ps(w, odd_channels(pairs), odd[c / 2][k]);
      }
    }
  }
  for (int k = 0; k < kVectors; ++k) {
    store_bfloat16_pairs(out + 16 * k, _mm256_add_ps(even[0][k], even[1][k]), _mm256_add_ps(odd[0][k], odd[1][k]));
  }
}

// The gradient row of one (query, head) as float32 vectors in the layouts the backward needs.
template <typename scalar_t, int kChannels>
struct GradRow;

template <int kChannels>
struct GradRow<float, kChannels> {
  static constexpr int kVectors = kChannels / 8;
  __m256 in_order[kVectors];

  explicit GradRow(const float* row) {
    for (int k = 0; k < kVectors; ++k) in_order[k] = _mm256_loadu_ps(row + 8 * k);
  }
  // 8 lanes whose sum is <grad, value row>
  __m256 dot(const float* value_row) const {
    __m256 partial = _mm256_mul_ps(_mm256_loadu_ps(value_row), in_order[0]);
    for (int k = 1; k < kVectors; ++k) {
      partial = _mm256_fmadd_ps(_mm256_loadu_ps(value_row + 8 * k), in_order[k], partial);
    }
    return partial;
  }
};

template <int kChannels>
struct GradRow<c10::BFloat16, kChannels> {
  static constexpr int kVectors = kChannels / 8;
  __m256 in_order[kVectors];  // for the scatter into the float32 gradient rows
  __m256 even[kVectors / 2], odd[kVectors / 2];

  explicit GradRow(const c10::BFloat16* row) {
    for (int k = 0; k < kVectors; ++k) in_order[k] = load_bfloat16(row + 8 * k);
    for (int k = 0; k < kVectors / 2; ++k) {
      const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * k));
      even[k] = even_channels(pairs);
      odd[k] = odd_channels(pairs);
    }
  }
  __m256 dot(const c10::BFloat16* value_row) const {
    __m256 partial = _mm256_setzero_ps();
    for (int k = 0; k < kVectors / 2; ++k) {
      const __m256i values = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(value_row + 16 * k));
      partial = _mm256_fmadd_ps(even_channels(values), even[k], partial);
      partial = _mm256_fmadd_ps(odd_channels(values), odd[k], partial);
    }
    return partial;
  }
};

// Backward of one (query, head), samples [0, count): adds scaled[c][i] * grad into the float32 gradient rows
// grad_rows[c][i] (kGradValue) and writes dots[c][i] = <grad, value_rows[c][i]> (kGradSampling). Corners outside
// the map all point at one row, so every corner's gradient row is read and written before the next one's.
template <bool kGradValue, bool kGradSampling, typename scalar_t, int kChannels>
inline void backward_head(const GradRow<scalar_t, kChannels>& grad, const scalar_t* const* const value_rows[4],
                          float* const* const grad_rows[4], const float* const scaled[4], int64_t count,
                          float* const dots[4]) {
  constexpr int kVectors = kChannels / 8;
  for (int64_t first = 0; first < count; first += 2) {
    __m256 partial[8];  // sample first + s, corner c at 4 s + c
    for (int s = 0; s < 2; ++s) {
      const int64_t i = first + s;
      for (int c = 0; c < 4; ++c) {
        if (i >= count) {
          partial[4 * s + c] = _mm256_setzero_ps();
          continue;
        }
        if constexpr (kGradValue) {
          float* row = grad_rows[c][i];
          const __m256 w = _mm256_set1_ps(scaled[c][i]);
          for (int k = 0; k < kVectors; ++k) {
            _mm256_storeu_ps(row + 8 * k, _mm256_fmadd_ps(w, grad.in_order[k], _mm256_loadu_ps(row + 8 * k)));
          }
        }
        if constexpr (kGradSampling) partial[4 * s + c] = grad.dot(value_rows[c][i]);
      }
    }
    if constexpr (kGradSampling) {
      alignas(32) float sums[8];
      _mm256_store_ps(sums, sum_lanes_of_8(partial));
      const int64_t samples = count - first < 2 ? 1 : 2;
      for (int s = 0; s < samples; ++s) {
        for (int c = 0; c < 4; ++c) dots[c][first + s] = sums[4 * s + c];
      }
    }
  }
}

}  // namespace avx2
}  // namespace deformable_detr

#endif  // __AVX2__ && __FMA__
