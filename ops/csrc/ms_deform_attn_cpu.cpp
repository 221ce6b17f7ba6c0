// CPU kernels of multi-scale deformable attention, registered as implementations of the torch.library ops
// deformable_detr::ms_deform_attn_forward / ms_deform_attn_backward (schemas are defined in ops/custom_ops.py).
//
// Layouts (all contiguous): value (N, S, M, D); spatial_shapes (L, 2) int64 (H, W); level_start_index (L,) int64;
// sampling_locations (N, Lq, M, L, P, 2) as (x, y) in [0, 1]; attention_weights (N, Lq, M, L, P);
// output (N, Lq, M * D). Half and bfloat16 are stored as such and accumulate in float32. The forward also takes
// float32 sampling_locations and attention_weights with a half-precision value (the inference path: no float32
// copy of value; the backward takes one dtype).
//
// Both kernels work one head at a time: they locate many samples at once (ms_deform_attn_cpu_sampling.h), then run
// over the channels of each sample's four corner rows, read from a contiguous copy of the head's rows where the
// queries sample each row more than once (HeadRows). D = 32 (the model's) is compiled with its size known.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <array>
#include <cstdlib>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "bilinear.h"
#include "checks.h"
#include "ms_deform_attn_cpu_avx2.h"
#include "ms_deform_attn_cpu_avx512.h"
#include "ms_deform_attn_cpu_sampling.h"

#ifndef DETR_MSDA_HAVE_AVX512
#define DETR_MSDA_HAVE_AVX512 0
#endif
#ifndef DETR_MSDA_HAVE_AVX2
#define DETR_MSDA_HAVE_AVX2 0
#endif

namespace deformable_detr {
namespace {

// The inner loops a call runs, from the least to the most: the portable ones (plain C++ the compiler vectorises),
// the AVX2 ones, the AVX-512 ones, the AVX-512 ones with the native bfloat16 instructions; each only where this
// build has it (ops/build.py compiles for what torch reports of the CPU). A path runs the widest loops it has for
// a call's dtype and D, the portable ones when none covers them. DETR_MSDA_CPU_KERNEL=portable, =avx2 or =avx512
// asks for less than the build's best (tests and comparisons), read at every call.
enum class Path { kPortable, kAvx2, kAvx512, kAvx512Bfloat16 };

Path chosen_path() {
#if DETR_MSDA_HAVE_AVX512
  const Path best = avx512::kHasNativeBfloat16 ? Path::kAvx512Bfloat16 : Path::kAvx512;
#elif DETR_MSDA_HAVE_AVX2
  const Path best = Path::kAvx2;
#else
  const Path best = Path::kPortable;
#endif
  const char* requested = std::getenv("DETR_MSDA_CPU_KERNEL");
  const std::string name = requested == nullptr ? "" : requested;
  if (name.empty() || name == "auto") return best;
  if (name == "portable") return Path::kPortable;
  if (name == "avx2") return std::min(best, Path::kAvx2);
  if (name == "avx512") return std::min(best, Path::kAvx512);
  TORCH_CHECK_VALUE(false, "DETR_MSDA_CPU_KERNEL must be auto, avx512, avx2 or portable, got '", name, "'");
}

// Whether the AVX-512 loops cover scalar_t rows of kChannels channels (0: D known at run time only).
template <typename scalar_t, int kChannels>
constexpr bool kAvx512Covers = DETR_MSDA_HAVE_AVX512 && kChannels > 0 &&
                               ((std::is_same_v<scalar_t, float> && kChannels % 16 == 0) ||
                                (std::is_same_v<scalar_t, c10::BFloat16> && kChannels % 32 == 0));

// Whether the AVX2 loops cover them (taken where the AVX-512 ones do not).
template <typename scalar_t, int kChannels>
constexpr bool kAvx2Covers = DETR_MSDA_HAVE_AVX2 && kChannels > 0 &&
                             ((std::is_same_v<scalar_t, float> && kChannels % 8 == 0) ||
                              (std::is_same_v<scalar_t, c10::BFloat16> && kChannels % 16 == 0));

// D of the kernel: the compile-time kChannels, or the run-time channels when kChannels is 0.
template <int kChannels>
inline int64_t channel_count(const Sizes& s) {
  return kChannels > 0 ? kChannels : s.channels;
}

// Asks for the `bytes` at `data` to be brought into the cache (kWrite: to be written).
template <bool kWrite = false>
inline void prefetch(const void* data, int64_t bytes) {
  const char* first = static_cast<const char*>(data);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(first + offset, kWrite ? 1 : 0, 3);
}

// Where a task reads the value rows of one head of one batch item: in value (N, S, M, D) itself, rows M * D apart,
// or, with `contiguous`, in a copy of them one after another. In value's own layout a head's rows share 1 / M of the
// cache's sets, so the rows around a query, which its neighbours sample again, do not stay in the cache. The copy
// lives in a buffer each thread keeps between calls (a fresh one would fault in fresh pages on every call).
template <typename scalar_t, int kChannels>
class HeadRows {
 public:
  HeadRows(const scalar_t* value, const Sizes& s, bool contiguous) : value_(value), s_(s), contiguous_(contiguous) {}

  // {the first row, the distance between rows} of head `head` of batch item `batch`
  std::pair<const scalar_t*, int64_t> operator()(int64_t batch, int64_t head) {
    const int64_t channels = channel_count<kChannels>(s_), row_stride = s_.heads * channels;
    const scalar_t* first = value_ + batch * s_.positions * row_stride + head * channels;
    if (!contiguous_) return {first, row_stride};
    thread_local Buffer buffer;
    if (buffer.owner != this || batch != batch_ || head != head_) {
      buffer.owner = this, batch_ = batch, head_ = head;
      constexpr int64_t kAlign = 64 / static_cast<int64_t>(sizeof(scalar_t));  // rows start on a cache line
      if (static_cast<int64_t>(buffer.storage.size()) < s_.positions * channels + kAlign) {
        buffer.storage.resize(s_.positions * channels + kAlign);
      }
      const auto address = reinterpret_cast<std::uintptr_t>(buffer.storage.data());
      rows_ = buffer.storage.data() + (64 - address % 64) % 64 / sizeof(scalar_t);
      // rows M * D apart: too far apart for the hardware prefetchers, so ask for the row kAhead on
      constexpr int64_t kAhead = 16;
      const int64_t row_bytes = channels * static_cast<int64_t>(sizeof(scalar_t));
      for (int64_t position = 0; position < s_.positions; ++position) {
        if (position + kAhead < s_.positions) prefetch(first + (position + kAhead) * row_stride, row_bytes);
        std::copy_n(first + position * row_stride, channels, rows_ + position * channels);
      }
    }
    return {rows_, channels};
  }

 private:
  struct Buffer {
    std::vector<scalar_t> storage;
    const HeadRows* owner = nullptr;  // whose head the storage holds
  };
  const scalar_t* value_;
  Sizes s_;
  bool contiguous_;
  int64_t batch_ = -1, head_ = -1;
  scalar_t* rows_ = nullptr;
};

constexpr int64_t kChunk = 32;  // queries of a forward task

// Tasks [begin, end) of the forward: task t = (batch, head, chunk of kChunk queries), the chunk fastest; `chunk_levels`
// holds the head's levels kChunk times over (a SampleLevels of kChunk heads). `head_inputs.gather(batch_query, head,
// location, weight)` writes the head's sampling locations (L * P, 2) and attention weights (L * P), both of coord_t:
// scalar_t's dtype or float32 (a half-precision value sampled at float32 locations, the inference path's mix).
template <typename scalar_t, typename coord_t, int kChannels, typename HeadInputs>
void forward_tasks(const scalar_t* value, bool contiguous,
                   const SampleLevels<at::opmath_type<scalar_t>>& chunk_levels, const HeadInputs& head_inputs,
                   scalar_t* output, const Sizes& s, Path path, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = channel_count<kChannels>(s);
  const int64_t head_samples = s.levels * s.points;
  const int64_t chunks = (s.queries + kChunk - 1) / kChunk;
  // the chunk's inputs gathered from the queries' rows, then its geometry in one run of kChunk * L * P samples
  std::vector<coord_t> locations(2 * kChunk * head_samples), attention(kChunk * head_samples);
  SampleGeometry<acc_t> geometry(kChunk * head_samples);
  CornerRows<const scalar_t> corners(kChunk * head_samples);
  const acc_t* weights[4] = {geometry.scaled[0].data(), geometry.scaled[1].data(), geometry.scaled[2].data(),
                             geometry.scaled[3].data()};
  const std::vector<scalar_t> zeros(channels, scalar_t(0));
  std::vector<acc_t> accumulator(channels);
  HeadRows<scalar_t, kChannels> head_rows(value, s, contiguous);
  for (int64_t task = begin; task < end; ++task) {
    // with contiguous rows, the chunk fastest (a thread keeps to one head's rows); in place, the head fastest (the
    // chunk's inputs, a few KB, stay cached for its heads)
    const int64_t batch = task / (s.heads * chunks);
    const int64_t head = contiguous ? task / chunks % s.heads : task % s.heads;
    const int64_t chunk = contiguous ? task % chunks : task / s.heads % chunks;
    const int64_t first_query = batch * s.queries + chunk * kChunk;
    const int64_t count = std::min(kChunk, (batch + 1) * s.queries - first_query);
    for (int64_t k = 0; k < count; ++k) {
      // a head's inputs are a slice of each query's, M slices apart: ask for those of a query kAhead on
      constexpr int64_t kAhead = 8;
      if (first_query + k + kAhead < (batch + 1) * s.queries) {
        head_inputs.prefetch_head(first_query + k + kAhead, head);
      }
      head_inputs.gather(first_query + k, head, locations.data() + 2 * k * head_samples,
                         attention.data() + k * head_samples);
    }
    const std::pair<const scalar_t*, int64_t> rows = head_rows(batch, head);
    locate_samples<false>(locations.data(), attention.data(), 0, count * head_samples, chunk_levels, geometry);
    corner_rows<false>(geometry, chunk_levels, 0, count * head_samples, rows.first, rows.second, 0, zeros.data(),
                       corners.rows);
    for (int64_t k = 0; k < count; ++k) {
      const int64_t first = k * head_samples, last = first + head_samples;
      scalar_t* __restrict__ out = output + ((first_query + k) * s.heads + head) * channels;
#if DETR_MSDA_HAVE_AVX512
      if constexpr (kAvx512Covers<scalar_t, kChannels>) {
        if (path >= Path::kAvx512) {
          avx512::forward_head<kChannels>(corners.rows, weights, first, last, out, path == Path::kAvx512Bfloat16);
          continue;
        }
      }
#endif
#if DETR_MSDA_HAVE_AVX2
      if constexpr (kAvx2Covers<scalar_t, kChannels>) {
        if (path >= Path::kAvx2) {
          avx2::forward_head<kChannels>(corners.rows, weights, first, last, out);
          continue;
        }
      }
#endif
      acc_t* __restrict__ sum = accumulator.data();
      std::fill(sum, sum + channels, acc_t(0));
      for (int64_t i = first; i < last; ++i) {
        const scalar_t *r0 = corners.rows[0][i], *r1 = corners.rows[1][i], *r2 = corners.rows[2][i],
                       *r3 = corners.rows[3][i];
        const acc_t w0 = weights[0][i], w1 = weights[1][i], w2 = weights[2][i], w3 = weights[3][i];
#pragma omp simd
        for (int64_t d = 0; d < channels; ++d) {
          sum[d] += (w0 * static_cast<acc_t>(r0[d]) + w1 * static_cast<acc_t>(r1[d])) +
                    (w2 * static_cast<acc_t>(r2[d]) + w3 * static_cast<acc_t>(r3[d]));
        }
      }
#pragma omp simd
      for (int64_t d = 0; d < channels; ++d) out[d] = static_cast<scalar_t>(sum[d]);
    }
  }
}

// The forward over every query and head, in parallel (forward_tasks). One head at a time, kChunk consecutive
// queries: neighbouring queries sample neighbouring rows, which then stay in the caches, where the rows are
// contiguous (HeadRows). The copy pays where the queries sample each row more than once on average (the encoder:
// the forward at 800x1333 took 17% less time in float32, 30% less in bfloat16 on a 2-core AVX2 EPYC, the copy
// included); the decoder's 300 queries read value in place.
template <typename scalar_t, typename coord_t, typename HeadInputs>
void forward_kernel(const scalar_t* value, const int64_t* spatial_shapes, const int64_t* level_start_index,
                    const HeadInputs& head_inputs, scalar_t* output, const Sizes& s) {
  Sizes chunk_sizes = s;
  chunk_sizes.heads = kChunk;
  const SampleLevels<at::opmath_type<scalar_t>> chunk_levels(spatial_shapes, level_start_index, chunk_sizes);
  const Path path = chosen_path();
  // a head's rows copied contiguous where the queries sample them more than once on average (the encoder)
  const bool contiguous = s.heads > 1 && s.queries * s.levels * s.points >= s.positions;
  const int64_t chunks = (s.queries + kChunk - 1) / kChunk;
  at::parallel_for(0, s.batch * s.heads * chunks, 1, [&](int64_t begin, int64_t end) {
    if (s.channels == 32) {
      forward_tasks<scalar_t, coord_t, 32>(value, contiguous, chunk_levels, head_inputs, output, s, path, begin, end);
    } else {
      forward_tasks<scalar_t, coord_t, 0>(value, contiguous, chunk_levels, head_inputs, output, s, path, begin, end);
    }
  });
}

// The op's own inputs: each head's rows of sampling_locations and attention_weights.
template <typename coord_t>
struct GivenInputs {
  const coord_t* sampling_locations;
  const coord_t* attention_weights;
  int64_t heads, head_samples;

  GivenInputs(const coord_t* sampling_locations, const coord_t* attention_weights, const Sizes& s)
      : sampling_locations(sampling_locations),
        attention_weights(attention_weights),
        heads(s.heads),
        head_samples(s.levels * s.points) {}

  void gather(int64_t batch_query, int64_t head, coord_t* __restrict__ location, coord_t* __restrict__ weight) const {
    const int64_t first = (batch_query * heads + head) * head_samples;
    const coord_t* __restrict__ given_location = sampling_locations + 2 * first;
    const coord_t* __restrict__ given_weight = attention_weights + first;
    for (int64_t c = 0; c < 2 * head_samples; ++c) location[c] = given_location[c];  // no call: a few dozen
    for (int64_t j = 0; j < head_samples; ++j) weight[j] = given_weight[j];
  }
  void prefetch_head(int64_t batch_query, int64_t head) const {
    const int64_t first = (batch_query * heads + head) * head_samples;
    const char* loc = reinterpret_cast<const char*>(sampling_locations + 2 * first);
    const char* att = reinterpret_cast<const char*>(attention_weights + first);
    __builtin_prefetch(loc, 0, 3);
    __builtin_prefetch(loc + 64, 0, 3);
    __builtin_prefetch(att, 0, 3);
  }
};

// exp(x) for x <= 0 in float32 within 2 ulp, in plain arithmetic the compiler vectorises (std::exp it does not, and
// the softmax of ProjectedInputs takes one per sample): x = n ln 2 + r, |r| <= ln 2 / 2, exp(r) by its Taylor
// polynomial to r^7, 2^n from the exponent bits; below -87 (where exp underflows to 0 in float32) the result is 0.
inline float exp_nonpositive(float x) {
  const bool underflow = x < -87.0f;
  x = underflow ? 0.0f : x;
  const float n = static_cast<float>(static_cast<int32_t>(x * 1.44269504088896341f - 0.5f));  // nearest, x <= 0
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln 2 in two parts
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n; n >= -126 for x >= -87
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return underflow ? 0.0f : p * scale;
}

inline double exp_nonpositive(double x) { return std::exp(x); }

// The inputs computed from the query's projection, as MSDeformAttn does for 2-d reference points (the inference
// op): location = reference point of the level + offset / (W, H); weights = softmax over the L * P logits of each
// head. `projected` (N, Lq, M * L * P * 3) holds a query's offsets (M, L, P, 2) then its logits (M, L * P);
// reference_points (N, Lq, L, 2) are (x, y) in [0, 1].
template <typename scalar_t, typename coord_t>
class ProjectedInputs {
 public:
  ProjectedInputs(const scalar_t* projected, const coord_t* reference_points, const int64_t* spatial_shapes,
                  const Sizes& s)
      : projected_(projected),
        reference_points_(reference_points),
        levels_(s.levels),
        head_samples_(s.levels * s.points),
        query_samples_(s.heads * s.levels * s.points),
        inverse_size_(2 * head_samples_),
        reference_index_(2 * head_samples_) {
    // per coordinate c = 2 * (level * P + point) + axis of a head (every head alike): 1 / W or 1 / H of its
    // level, and where its reference coordinate lies in the query's (L, 2) reference points
    for (int64_t c = 0; c < 2 * head_samples_; ++c) {
      const int64_t level = c / 2 / s.points, axis = c % 2;
      inverse_size_[c] = coord_t(1) / static_cast<coord_t>(spatial_shapes[2 * level + 1 - axis]);
      reference_index_[c] = static_cast<int32_t>(2 * level + axis);
    }
  }

  void gather(int64_t batch_query, int64_t head, coord_t* __restrict__ location, coord_t* __restrict__ weight) const {
    const int64_t head_coordinates = 2 * head_samples_;
    const scalar_t* __restrict__ offsets = offsets_of(batch_query, head);
    const scalar_t* __restrict__ logits = logits_of(batch_query, head);
    const coord_t* __restrict__ reference = reference_points_ + batch_query * 2 * levels_;
    const coord_t* __restrict__ inverse = inverse_size_.data();
    const int32_t* __restrict__ index = reference_index_.data();
    for (int64_t c = 0; c < head_coordinates; ++c) {
      location[c] = reference[index[c]] + static_cast<coord_t>(offsets[c]) * inverse[c];
    }
    coord_t largest = static_cast<coord_t>(logits[0]);
    for (int64_t j = 1; j < head_samples_; ++j) {
      const coord_t logit = static_cast<coord_t>(logits[j]);
      largest = logit > largest ? logit : largest;
    }
    coord_t total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < head_samples_; ++j) {
      weight[j] = exp_nonpositive(static_cast<coord_t>(logits[j]) - largest);
      total += weight[j];
    }
    const coord_t scale = coord_t(1) / total;
#pragma omp simd
    for (int64_t j = 0; j < head_samples_; ++j) weight[j] *= scale;
  }

  void prefetch_head(int64_t batch_query, int64_t head) const {
    prefetch(offsets_of(batch_query, head), 2 * head_samples_ * static_cast<int64_t>(sizeof(scalar_t)));
    prefetch(logits_of(batch_query, head), head_samples_ * static_cast<int64_t>(sizeof(scalar_t)));
  }

 private:
  const scalar_t* offsets_of(int64_t batch_query, int64_t head) const {
    return projected_ + batch_query * 3 * query_samples_ + head * 2 * head_samples_;
  }
  const scalar_t* logits_of(int64_t batch_query, int64_t head) const {
    return projected_ + batch_query * 3 * query_samples_ + 2 * query_samples_ + head * head_samples_;
  }

  const scalar_t* projected_;
  const coord_t* reference_points_;
  int64_t levels_, head_samples_, query_samples_;
  std::vector<coord_t> inverse_size_;
  std::vector<int32_t> reference_index_;
};

// The tensors of the backward (grad_value, grad_sampling_locations, grad_attention_weights null if not asked for).
template <typename scalar_t>
struct BackwardPointers {
  const scalar_t* grad_output;
  const scalar_t* value;
  const scalar_t* sampling_locations;
  const scalar_t* attention_weights;
  scalar_t* grad_value;
  scalar_t* grad_sampling_locations;
  scalar_t* grad_attention_weights;
};

// Stores `count` acc_t rows of `channels` (stride `channels`) rounded into scalar_t rows of stride `out_stride`.
template <typename scalar_t, int kChannels, typename acc_t>
void store_rows(const acc_t* rows, int64_t count, int64_t channels, scalar_t* out, int64_t out_stride, Path path) {
  for (int64_t row = 0; row < count; ++row) {
    const acc_t* __restrict__ source = rows + row * channels;
    scalar_t* __restrict__ target = out + row * out_stride;
#if DETR_MSDA_HAVE_AVX512
    if constexpr (kAvx512Covers<scalar_t, kChannels> && std::is_same_v<scalar_t, c10::BFloat16>) {
      if (path >= Path::kAvx512) {
        for (int64_t d = 0; d < kChannels; d += 16) {
          const __m512 values = _mm512_loadu_ps(source + d);
          if (path == Path::kAvx512Bfloat16) {
            avx512::store_bfloat16<true>(target + d, values);
          } else {
            avx512::store_bfloat16<false>(target + d, values);
          }
        }
        continue;
      }
    }
#endif
#if DETR_MSDA_HAVE_AVX2
    if constexpr (kAvx2Covers<scalar_t, kChannels> && std::is_same_v<scalar_t, c10::BFloat16>) {
      if (path >= Path::kAvx2) {
        for (int64_t d = 0; d < kChannels; d += 8) avx2::store_bfloat16(target + d, _mm256_loadu_ps(source + d));
        continue;
      }
    }
#endif
#pragma omp simd
    for (int64_t d = 0; d < channels; ++d) target[d] = static_cast<scalar_t>(source[d]);
  }
}

// One backward task: the gradients of head `head` of batch item `batch`, levels [first_level, last_level). The
// task owns the grad_value rows of those levels and head: it accumulates into them without atomics, in an order
// that does not depend on the thread count (the results are bitwise deterministic), in a buffer of the task's rows
// one after another (acc_t: float32 for half precision), stored (rounded) into grad_value at the end: in grad_value
// itself a head's rows lie M * D apart and share 1 / M of the cache's sets. Value rows come from `head_rows`.
// kGradValue / kGradSampling drop the scatter / the dot products that nobody asked for.
template <typename scalar_t, int kChannels, bool kGradValue, bool kGradSampling>
void backward_task(const BackwardPointers<scalar_t>& p, const int64_t* spatial_shapes,
                   const int64_t* level_start_index, const SampleLevels<at::opmath_type<scalar_t>>& levels,
                   const Sizes& s, Path path, int64_t batch, int64_t head, int64_t first_level, int64_t last_level,
                   std::vector<at::opmath_type<scalar_t>>& buffer, HeadRows<scalar_t, kChannels>& head_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = channel_count<kChannels>(s);
  const int64_t row_stride = s.heads * channels;
  const int64_t first_sample = (head * s.levels + first_level) * s.points;  // of a query's M * L * P samples
  const int64_t count = (last_level - first_level) * s.points;
  const int64_t query_samples = s.heads * s.levels * s.points;
  // the positions of the task's levels (valid levels only: the others are never touched)
  int64_t first_position = s.positions, last_position = 0;
  for (int64_t level = first_level; level < last_level; ++level) {
    if (!level_in_bounds(spatial_shapes, level_start_index, level, s.positions)) continue;
    first_position = std::min(first_position, level_start_index[level]);
    last_position = std::max(last_position,
                             level_start_index[level] + spatial_shapes[2 * level] * spatial_shapes[2 * level + 1]);
  }
  if (first_position >= last_position) return;  // no valid level: grad_value stays zero, samples are skipped
  const int64_t head_base = batch * s.positions * row_stride + head * channels;
  acc_t* accumulate = nullptr;  // the task's rows of grad_value, contiguous
  if constexpr (kGradValue) {
    buffer.resize((last_position - first_position) * channels);
    accumulate = buffer.data();
    std::fill(buffer.begin(), buffer.end(), acc_t(0));
  }
  // the widest loops the path has for scalar_t and kChannels (none: the portable ones)
  const bool avx512_loops = kAvx512Covers<scalar_t, kChannels> && path >= Path::kAvx512;
  const bool avx2_loops = !avx512_loops && kAvx2Covers<scalar_t, kChannels> && path >= Path::kAvx2;
  const bool vectorised = avx512_loops || avx2_loops;
  SampleGeometry<acc_t> geometry(count);
  CornerRows<const scalar_t> value_rows(count);
  CornerRows<acc_t> grad_rows(count);
  const acc_t* scaled[4] = {geometry.scaled[0].data(), geometry.scaled[1].data(), geometry.scaled[2].data(),
                            geometry.scaled[3].data()};
  const std::vector<scalar_t> zeros(channels, scalar_t(0));
  std::vector<acc_t> discard(channels);  // gradient sink of corners outside the map
  std::vector<acc_t> grad_out(channels), dot_columns[4];
  acc_t* dots[4];
  for (int c = 0; c < 4; ++c) dot_columns[c].resize((count + 3) / 4 * 4), dots[c] = dot_columns[c].data();
  const scalar_t* attention = nullptr;
  for (int64_t query = 0; query < s.queries; ++query) {
    const int64_t batch_query = batch * s.queries + query;
    const int64_t sample_offset = batch_query * query_samples + first_sample;
    // A task reads one head's slice of every query, 1 KB apart in the model's layout: too far apart for the
    // hardware prefetchers, so ask for the slices of a query kAhead queries on.
    constexpr int64_t kAhead = 8;
    if (query + kAhead < s.queries) {
      const int64_t ahead = sample_offset + kAhead * query_samples;
      prefetch(p.grad_output + ((batch_query + kAhead) * s.heads + head) * channels, channels * sizeof(scalar_t));
      prefetch(p.sampling_locations + 2 * ahead, 2 * count * sizeof(scalar_t));
      prefetch(p.attention_weights + ahead, count * sizeof(scalar_t));
      if constexpr (kGradSampling) {
        prefetch<true>(p.grad_sampling_locations + 2 * ahead, 2 * count * sizeof(scalar_t));
        prefetch<true>(p.grad_attention_weights + ahead, count * sizeof(scalar_t));
      }
    }
    attention = p.attention_weights + sample_offset;
    locate_samples<true>(p.sampling_locations + 2 * sample_offset, attention, first_sample, count, levels,
                         geometry);
    if constexpr (kGradSampling) {
      const std::pair<const scalar_t*, int64_t> rows = head_rows(batch, head);
      corner_rows<false>(geometry, levels, first_sample, count, rows.first, rows.second, 0, zeros.data(),
                         value_rows.rows);
    }
    if constexpr (kGradValue) {
      corner_rows<false>(geometry, levels, first_sample, count, accumulate, channels, first_position,
                         discard.data(), grad_rows.rows);
    }
    const scalar_t* grad_out_row = p.grad_output + (batch_query * s.heads + head) * channels;
#if DETR_MSDA_HAVE_AVX512
    if constexpr (kAvx512Covers<scalar_t, kChannels>) {
      if (avx512_loops) {
        const avx512::GradRow<scalar_t, kChannels> grad(grad_out_row);
        if (path == Path::kAvx512Bfloat16) {
          avx512::backward_head<true, kGradValue, kGradSampling>(grad, value_rows.rows, grad_rows.rows, scaled,
                                                                 count, dots);
        } else {
          avx512::backward_head<false, kGradValue, kGradSampling>(grad, value_rows.rows, grad_rows.rows, scaled,
                                                                  count, dots);
        }
      }
    }
#endif
#if DETR_MSDA_HAVE_AVX2
    if constexpr (kAvx2Covers<scalar_t, kChannels>) {
      if (avx2_loops) {
        const avx2::GradRow<scalar_t, kChannels> grad(grad_out_row);
        avx2::backward_head<kGradValue, kGradSampling>(grad, value_rows.rows, grad_rows.rows, scaled, count, dots);
      }
    }
#endif
    if (!vectorised) {
      acc_t* __restrict__ g = grad_out.data();
#pragma omp simd
      for (int64_t d = 0; d < channels; ++d) g[d] = static_cast<acc_t>(grad_out_row[d]);
      for (int64_t i = 0; i < count; ++i) {
        for (int c = 0; c < 4; ++c) {
          if constexpr (kGradValue) {
            // corners outside the map all write `discard`: one corner at a time
            acc_t* __restrict__ target = grad_rows.rows[c][i];
            const acc_t scale = scaled[c][i];
#pragma omp simd
            for (int64_t d = 0; d < channels; ++d) target[d] += scale * g[d];
          }
          if constexpr (kGradSampling) {
            const scalar_t* __restrict__ row = value_rows.rows[c][i];
            acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < channels; ++d) dot += g[d] * static_cast<acc_t>(row[d]);
            dots[c][i] = dot;
          }
        }
      }
    }
    if constexpr (kGradSampling) {
      // d out / d attention = sum_c w_c <g, v_c>; d out / d w (pixel column) = attention * ((1 - dh) (<g, v1> -
      // <g, v0>) + dh (<g, v3> - <g, v2>)), and d w / d x = W; likewise for h and y. Corners outside the map have
      // v_c = 0, so <g, v_c> = 0; a sample that touches nothing gets exactly 0.
      const acc_t* __restrict__ dot0 = dots[0];
      const acc_t* __restrict__ dot1 = dots[1];
      const acc_t* __restrict__ dot2 = dots[2];
      const acc_t* __restrict__ dot3 = dots[3];
      const acc_t* __restrict__ weight0 = geometry.weight[0].data();
      const acc_t* __restrict__ weight1 = geometry.weight[1].data();
      const acc_t* __restrict__ weight2 = geometry.weight[2].data();
      const acc_t* __restrict__ weight3 = geometry.weight[3].data();
      const acc_t* __restrict__ frac_h = geometry.frac_h.data();
      const acc_t* __restrict__ frac_w = geometry.frac_w.data();
      const int32_t* __restrict__ corners = geometry.corners.data();
      const acc_t* __restrict__ width = levels.width.data() + first_sample;
      const acc_t* __restrict__ height = levels.height.data() + first_sample;
      const scalar_t* __restrict__ sample_attention = attention;
      scalar_t* __restrict__ grad_attention = p.grad_attention_weights + sample_offset;
      scalar_t* __restrict__ grad_location = p.grad_sampling_locations + 2 * sample_offset;
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) {
        const acc_t a = static_cast<acc_t>(sample_attention[i]), dh = frac_h[i], dw = frac_w[i];
        const acc_t by_attention = weight0[i] * dot0[i] + weight1[i] * dot1[i] + weight2[i] * dot2[i] +
                                   weight3[i] * dot3[i];
        const acc_t by_w = (acc_t(1) - dh) * (dot1[i] - dot0[i]) + dh * (dot3[i] - dot2[i]);
        const acc_t by_h = (acc_t(1) - dw) * (dot2[i] - dot0[i]) + dw * (dot3[i] - dot1[i]);
        const acc_t by_x = a * by_w * width[i], by_y = a * by_h * height[i];
        const bool touches = corners[i] != 0;
        grad_attention[i] = static_cast<scalar_t>(touches ? by_attention : acc_t(0));
        grad_location[2 * i] = static_cast<scalar_t>(touches ? by_x : acc_t(0));
        grad_location[2 * i + 1] = static_cast<scalar_t>(touches ? by_y : acc_t(0));
      }
    }
  }
  if constexpr (kGradValue) {
    store_rows<scalar_t, kChannels>(accumulate, last_position - first_position, channels,
                                    p.grad_value + head_base + first_position * row_stride, row_stride, path);
  }
}

// Work is split by (batch, head), and also by level when that gives too few tasks for the threads.
template <typename scalar_t, bool kGradValue, bool kGradSampling>
void backward_kernel(const BackwardPointers<scalar_t>& p, const int64_t* spatial_shapes,
                     const int64_t* level_start_index, const Sizes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const SampleLevels<acc_t> levels(spatial_shapes, level_start_index, s);
  const Path path = chosen_path();
  const int64_t level_groups = s.batch * s.heads >= 2 * at::get_num_threads() ? 1 : s.levels;
  const int64_t levels_per_group = (s.levels + level_groups - 1) / level_groups;
  // each head's value rows read from a contiguous copy (HeadRows) where the forward does, and a task's levels are all
  // of them (one copy per task)
  const bool contiguous = kGradSampling && level_groups == 1 && s.heads > 1 &&
                          s.queries * s.levels * s.points >= s.positions;
  at::parallel_for(0, s.batch * s.heads * level_groups, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<acc_t> buffer;  // kept between calls: no fresh pages to fault in on every call
    HeadRows<scalar_t, 32> rows32(p.value, s, contiguous);
    HeadRows<scalar_t, 0> rows(p.value, s, contiguous);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t first_level = (task % level_groups) * levels_per_group;
      const int64_t last_level = std::min(s.levels, first_level + levels_per_group);
      const int64_t head = (task / level_groups) % s.heads;
      const int64_t batch = task / (level_groups * s.heads);
      if (first_level >= last_level) continue;
      if (s.channels == 32) {
        backward_task<scalar_t, 32, kGradValue, kGradSampling>(p, spatial_shapes, level_start_index, levels, s,
                                                                path, batch, head, first_level, last_level, buffer,
                                                                rows32);
      } else {
        backward_task<scalar_t, 0, kGradValue, kGradSampling>(p, spatial_shapes, level_start_index, levels, s,
                                                               path, batch, head, first_level, last_level, buffer,
                                                               rows);
      }
    }
  });
}

// True when the levels tile value's S positions in order, as ops.validation requires: then the backward tasks
// write every row of grad_value, which need not be zeroed first.
bool levels_tile_positions(const int64_t* spatial_shapes, const int64_t* level_start_index, const Sizes& s) {
  int64_t next = 0;
  for (int64_t level = 0; level < s.levels; ++level) {
    if (level_start_index[level] != next || spatial_shapes[2 * level] <= 0 || spatial_shapes[2 * level + 1] <= 0) {
      return false;
    }
    next += spatial_shapes[2 * level] * spatial_shapes[2 * level + 1];
  }
  return next == s.positions;
}

void check_index_range(const Sizes& s) {
  TORCH_CHECK_VALUE(s.positions < std::numeric_limits<int32_t>::max(),
                    "the CPU kernel of ms_deform_attn takes at most 2^31 - 1 positions, value has ", s.positions);
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                               /*float_coordinates=*/true);
  check_index_range(s);
  at::Tensor output = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());
  const bool float_coordinates = sampling_locations.scalar_type() != value.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>) {
      if (float_coordinates) {
        forward_kernel<scalar_t, float>(
            value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
            GivenInputs<float>(sampling_locations.data_ptr<float>(), attention_weights.data_ptr<float>(), s),
            output.data_ptr<scalar_t>(), s);
        return;
      }
    }
    forward_kernel<scalar_t, scalar_t>(
        value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
        GivenInputs<scalar_t>(sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(), s),
        output.data_ptr<scalar_t>(), s);
  });
  return output;
}

// The forward from the query's projection (see ProjectedInputs), for inference: no gradient. value (N, S, M, D) and
// projected (N, Lq, M * L * P * 3) share a dtype; reference_points (N, Lq, L, 2) are float32 (float64 with a float64
// value). P is read from projected's last size.
at::Tensor ms_deform_attn_projected_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                const at::Tensor& level_start_index,
                                                const at::Tensor& reference_points, const at::Tensor& projected) {
  TORCH_CHECK_VALUE(value.dim() == 4 && projected.dim() == 3 && reference_points.dim() == 4 &&
                        spatial_shapes.dim() == 2,
                    "value (N, S, M, D), projected (N, Lq, M * L * P * 3), reference_points (N, Lq, L, 2) and "
                    "spatial_shapes (L, 2) expected");
  const int64_t heads = value.size(2), levels = spatial_shapes.size(0);
  const int64_t per_query = projected.size(2);
  TORCH_CHECK_VALUE(per_query % (3 * heads * levels) == 0 && per_query > 0,
                    "projected's last size must be M * L * P * 3, got ", per_query);
  const Sizes s{value.size(0), value.size(1), heads, value.size(3), projected.size(1), levels,
                per_query / (3 * heads * levels)};
  TORCH_CHECK_VALUE(projected.size(0) == s.batch &&
                        reference_points.sizes() == at::IntArrayRef({s.batch, s.queries, s.levels, 2}),
                    "projected must be (N, Lq, M * L * P * 3) and reference_points (N, Lq, L, 2), got ",
                    projected.sizes(), " and ", reference_points.sizes());
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == s.levels,
                    "level_start_index must be (L,), got ", level_start_index.sizes());
  TORCH_CHECK_TYPE(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
                   "spatial_shapes and level_start_index must be int64");
  TORCH_CHECK_TYPE(projected.scalar_type() == value.scalar_type(), "projected must have value's dtype");
  const at::ScalarType coordinates = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(reference_points.scalar_type() == coordinates, "reference_points must be ",
                   c10::toString(coordinates));
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &reference_points, &projected}) {
    TORCH_CHECK_VALUE(t->is_contiguous(), "inputs must be contiguous");
    TORCH_CHECK_VALUE(t->device().is_cpu(), "inputs must be on the CPU");
  }
  check_index_range(s);
  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  at::Tensor output = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_projected", [&] {
    using coord_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, coord_t>(
        value.data_ptr<scalar_t>(), shapes, level_start_index.data_ptr<int64_t>(),
        ProjectedInputs<scalar_t, coord_t>(projected.data_ptr<scalar_t>(), reference_points.data_ptr<coord_t>(), shapes,
                                           s),
        output.data_ptr<scalar_t>(), s);
  });
  return output;
}

// output_mask: which of (grad_value, grad_sampling_locations, grad_attention_weights) to compute; a gradient not
// asked for comes back as an empty tensor of shape (0,). Location and weight gradients share their reductions.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    std::array<bool, 3> output_mask) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_index_range(s);
  const at::Tensor grad = grad_output.contiguous();
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({s.batch, s.queries, s.heads * s.channels}),
                    "grad_output must be (N, Lq, M * D), got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == value.scalar_type(), "grad_output must have value's dtype");
  const bool want_value = output_mask[0];
  const bool want_sampling = output_mask[1] || output_mask[2];
  const at::Tensor nothing = at::empty({0}, value.options());
  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = level_start_index.data_ptr<int64_t>();
  // Rows no level covers (only with a layout ops.validation rejects) are never written: zero them up front.
  at::Tensor grad_value = !want_value ? at::Tensor()
                          : levels_tile_positions(shapes, starts, s) ? at::empty_like(value)
                                                                     : at::zeros_like(value);
  at::Tensor grad_sampling_locations = want_sampling ? at::empty_like(sampling_locations) : at::Tensor();
  at::Tensor grad_attention_weights = want_sampling ? at::empty_like(attention_weights) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    const BackwardPointers<scalar_t> pointers{
        grad.data_ptr<scalar_t>(),
        value.data_ptr<scalar_t>(),
        sampling_locations.data_ptr<scalar_t>(),
        attention_weights.data_ptr<scalar_t>(),
        want_value ? grad_value.data_ptr<scalar_t>() : nullptr,
        want_sampling ? grad_sampling_locations.data_ptr<scalar_t>() : nullptr,
        want_sampling ? grad_attention_weights.data_ptr<scalar_t>() : nullptr};
    if (want_value && want_sampling) {
      backward_kernel<scalar_t, true, true>(pointers, shapes, starts, s);
    } else if (want_value) {
      backward_kernel<scalar_t, true, false>(pointers, shapes, starts, s);
    } else if (want_sampling) {
      backward_kernel<scalar_t, false, true>(pointers, shapes, starts, s);
    }
  });
  return {want_value ? grad_value : nothing, output_mask[1] ? grad_sampling_locations : nothing,
          output_mask[2] ? grad_attention_weights : nothing};
}

}  // namespace
}  // namespace deformable_detr

TORCH_LIBRARY_IMPL(deformable_detr, CPU, m) {
  m.impl("ms_deform_attn_forward", &deformable_detr::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &deformable_detr::ms_deform_attn_backward_cpu);
  m.impl("ms_deform_attn_projected_forward", &deformable_detr::ms_deform_attn_projected_forward_cpu);
}
