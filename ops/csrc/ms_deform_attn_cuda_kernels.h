// The CUDA kernels of multi-scale deformable attention and their host-side launch code, written once for two
// compilers: nvcc builds them for the GPU (ms_deform_attn_cuda.cu), g++ builds the same text for the CPU through
// cuda_emulation.h (ms_deform_attn_emulated.cpp, used by the tests). The including file first provides the
// CUDA built-ins: the CUDA headers, or the emulation.
//
// Layout of the work. A group of `lanes` consecutive lanes of a warp (a power of two, at most 32) computes one
// (batch, query, head); each lane owns `V` consecutive channels, loaded as one vector (16 bytes when the channel
// count and the pointers allow: 4 floats, 8 halves or bfloat16s, 2 doubles; else narrower). The samples of the
// (batch, query, head) are shared out: lane k computes the corner geometry of every lanes-th sample once, and the
// group receives it with shuffles, so every lane spends a few instructions per sample on geometry instead of all
// of it. Offsets are int32 inside one batch item (value[b] has S * M * D elements, checked on the host) on an
// int64 base pointer (a batch item rather than a (batch, level) slice: the bound is then S * M * D < 2^31, 8 GB of
// float32 per image, and the offset needs no per-level base).
//
// Forward: out[b, q, m, channels of the lane] = sum over samples of attention * bilinear(value); one 16-byte
// load per in-map corner per lane. Backward (one fused kernel): reads the output gradient once per lane and
// every corner once per sample; the attention-weight and location gradients are linear in the four sums
// grad_output . corner (one multiply-add per corner and channel), reduced across the group with xor shuffles and
// written by the lane that owns the sample; the value gradient is scattered with atomics into a float32 (float64)
// accumulator: float4/float2 vector atomics on sm_90, one atomic per element before, in a layout of their own
// (atomic_layout) in which every atomic instruction of a warp fills whole 32-byte sectors. Native half2/bfloat162
// atomics into half storage would round every partial sum to 8-11 bits, so the accumulator stays float32 and is
// cast once at the end.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <array>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include "bilinear.h"
#include "checks.h"

// Global memory is reached through GlobalPointer<T> and MSDA_ADDRESS(pointer, bytes, Read | Write | Atomic), the
// address to access: a plain T* and the pointer itself for nvcc; the emulation's pointers remember their tensor and
// check every access (cuda_emulation.h). MSDA_HAS_VECTOR_ATOMICS: the float2/float4 atomics of sm_90 are compiled
// in; MSDA_USE_VECTOR_ATOMICS: they are used (the emulation runs either path, by set_architecture).
#ifndef MSDA_EMULATION
template <typename T>
using GlobalPointer = T*;
#define MSDA_ADDRESS(pointer, bytes, kind) (pointer)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MSDA_HAS_VECTOR_ATOMICS 1
#else
#define MSDA_HAS_VECTOR_ATOMICS 0
#endif
#define MSDA_USE_VECTOR_ATOMICS true
#endif

namespace deformable_detr {
namespace cuda_kernels {

constexpr int kThreads = 256;  // threads per block: 8 warps
constexpr unsigned kFullWarp = 0xffffffffu;

// V elements moved by one load or store instruction.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vector {
  T element[V];
};

__device__ __forceinline__ int smaller(int a, int b) { return a < b ? a : b; }

template <int V, typename T>
__device__ __forceinline__ Vector<T, V> load_vector(GlobalPointer<const T> address) {
  return *reinterpret_cast<const Vector<T, V>*>(MSDA_ADDRESS(address, sizeof(Vector<T, V>), Read));
}

template <int V, typename T>
__device__ __forceinline__ void store_vector(GlobalPointer<T> address, const Vector<T, V>& vector) {
  *reinterpret_cast<Vector<T, V>*>(MSDA_ADDRESS(address, sizeof(Vector<T, V>), Write)) = vector;
}

template <typename T>
__device__ __forceinline__ T load_scalar(GlobalPointer<const T> address) {
  return *MSDA_ADDRESS(address, sizeof(T), Read);
}

template <typename T>
__device__ __forceinline__ void store_scalar(GlobalPointer<T> address, T value) {
  *MSDA_ADDRESS(address, sizeof(T), Write) = value;
}

// Elements one atomic instruction adds for a lane: 4 or 2 floats where sm_90's vector atomics divide V, else 1.
template <typename acc_t, int V>
constexpr int vector_atomic_width() {
  if (!std::is_same<acc_t, float>::value) return 1;
  return V % 4 == 0 ? 4 : V % 2 == 0 ? 2 : 1;
}

// Adds A accumulator elements at `address` (aligned to A elements) with one atomic instruction (A = 2 or 4: sm_90's
// float2/float4 atomics).
template <int A, typename acc_t>
__device__ __forceinline__ void atomic_add(GlobalPointer<acc_t> address, const acc_t* values) {
  if (MSDA_MUTATION(kPlainAdd)) {  // a data race: the emulation must report it
#pragma unroll
    for (int i = 0; i < A; ++i) store_scalar(address + i, load_scalar<acc_t>(address + i) + values[i]);
    return;
  }
#if MSDA_HAS_VECTOR_ATOMICS
  if constexpr (A == 4) {
    atomicAdd(reinterpret_cast<float4*>(MSDA_ADDRESS(address, 4 * sizeof(acc_t), Atomic)),
              make_float4(values[0], values[1], values[2], values[3]));
    return;
  } else if constexpr (A == 2) {
    atomicAdd(reinterpret_cast<float2*>(MSDA_ADDRESS(address, 2 * sizeof(acc_t), Atomic)),
              make_float2(values[0], values[1]));
    return;
  }
#endif
  static_assert(A == 1 || MSDA_HAS_VECTOR_ATOMICS, "vector atomics need sm_90");
  atomicAdd(MSDA_ADDRESS(address, sizeof(acc_t), Atomic), values[0]);
}

// What the kernels read; sizes as int32 where the host checked they fit.
template <typename scalar_t>
struct Problem {
  GlobalPointer<const scalar_t> value;               // (N, S, M, D)
  GlobalPointer<const int64_t> spatial_shapes;       // (L, 2)
  GlobalPointer<const int64_t> level_start_index;    // (L,)
  GlobalPointer<const scalar_t> sampling_locations;  // (N, Lq, M, L, P, 2)
  GlobalPointer<const scalar_t> attention_weights;   // (N, Lq, M, L, P)
  int64_t query_heads;                 // N * Lq * M
  int positions, heads, channels, queries, levels, points;
  int lanes, lanes_log2;  // lanes per (batch, query, head)
};

// True in every lane of a warp whose first group is past the last (batch, query, head), so the warp may return
// as a whole before any shuffle (groups never straddle warps: lanes divides 32).
template <typename scalar_t>
__device__ __forceinline__ bool warp_is_idle(const Problem<scalar_t>& p) {
  const int64_t warp_first_thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31u);
  return (warp_first_thread >> p.lanes_log2) >= p.query_heads;
}

// The corners of one sample as the group shares them: offset of each corner's value row in the batch item,
// -1 for a corner outside the map (never read); all four -1 for a skipped sample.
template <typename acc_t>
struct SampleCorners {
  int offset[4];
  acc_t weight[4];  // bilinear weights (forward: times the attention weight)
  acc_t frac_h, frac_w, attention;
  acc_t height, width;
  bool inside;  // false: the sample lies wholly outside its map (or its level is malformed) and contributes 0
};

// The lane's own sample `sample` (0 <= sample < L * P) of the (batch, query, head) whose locations and weights
// start at `locations` and `attention`; any other `sample` gives a skipped sample.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ SampleCorners<acc_t> sample_corners(const Problem<scalar_t>& p, bool valid, int sample,
                                                               GlobalPointer<const scalar_t> locations,
                                                               GlobalPointer<const scalar_t> attention) {
  SampleCorners<acc_t> corners;
  corners.inside = false;
  corners.attention = acc_t(0);
  corners.frac_h = corners.frac_w = corners.height = corners.width = acc_t(0);
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    corners.offset[c] = -1;
    corners.weight[c] = acc_t(0);
  }
  if (!valid || sample >= p.levels * p.points) return corners;
  const int level = sample / p.points;
  if (!level_in_bounds(p.spatial_shapes, p.level_start_index, level, p.positions)) return corners;
  const int height = static_cast<int>(load_scalar(p.spatial_shapes + 2 * level));
  const int width = static_cast<int>(load_scalar(p.spatial_shapes + 2 * level + 1));
  const int start = static_cast<int>(load_scalar(p.level_start_index + level));
  BilinearCorners<acc_t, int> bilinear;
  if (!bilinear_corners<acc_t, int>(static_cast<acc_t>(load_scalar(locations + 2 * sample)),
                                    static_cast<acc_t>(load_scalar(locations + 2 * sample + 1)), height, width,
                                    bilinear)) {
    return corners;
  }
  const int row_stride = p.heads * p.channels;
  corners.inside = true;
  corners.attention = static_cast<acc_t>(load_scalar(attention + sample));
  corners.frac_h = bilinear.frac_h;
  corners.frac_w = bilinear.frac_w;
  corners.height = static_cast<acc_t>(height);
  corners.width = static_cast<acc_t>(width);
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    corners.offset[c] = bilinear.position[c] >= 0 ? (start + bilinear.position[c]) * row_stride : -1;
    corners.weight[c] = bilinear.weight[c];
  }
  return corners;
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads) forward_kernel(Problem<scalar_t> p, GlobalPointer<scalar_t> output) {
  using acc_t = at::opmath_type<scalar_t>;
  if (warp_is_idle(p)) return;  // a whole warp past the end leaves at once: no lane of it shuffles
  const int lane = threadIdx.x & (p.lanes - 1);
  const int64_t group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> p.lanes_log2;
  const bool active = group < p.query_heads;  // idle groups of the last busy warp still take part in the shuffles
  const int64_t query_head = active ? group : 0;
  const int64_t batch = query_head / (static_cast<int64_t>(p.queries) * p.heads);
  const int head = static_cast<int>(query_head % p.heads);
  const int samples = p.levels * p.points;
  const GlobalPointer<const scalar_t> value = p.value + (batch * p.positions * p.heads + head) * p.channels;
  const GlobalPointer<const scalar_t> locations = p.sampling_locations + query_head * samples * 2;
  const GlobalPointer<const scalar_t> attention = p.attention_weights + query_head * samples;
  const int chunks = p.channels / V;
  for (int chunk_base = 0; chunk_base < chunks; chunk_base += p.lanes) {  // one round unless D > 32 * V
    const int channel = (chunk_base + lane) * V;
    const bool owns = active && chunk_base + lane < chunks;
    acc_t sum[V];
#pragma unroll
    for (int i = 0; i < V; ++i) sum[i] = acc_t(0);
    for (int first = 0; first < samples; first += p.lanes) {
      SampleCorners<acc_t> mine = sample_corners<scalar_t, acc_t>(p, active, first + lane, locations, attention);
      const int count = smaller(p.lanes, samples - first);
      for (int k = 0; k < count; ++k) {
        if (MSDA_MUTATION(kOwnsBeforeShuffles) && !owns) continue;  // a divergent shuffle: the emulation must stop it
        int offset[4];
        acc_t weight[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          offset[c] = __shfl_sync(kFullWarp, mine.offset[c], k, p.lanes);
          const int weight_lane = MSDA_MUTATION(kForwardWeightLane) ? k ^ 1 : k;  // a wrong lane: wrong results
          weight[c] = __shfl_sync(kFullWarp, mine.attention * mine.weight[c], weight_lane, p.lanes);
        }
        if (!owns) continue;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (offset[c] < 0) continue;
          const Vector<scalar_t, V> corner = load_vector<V>(value + offset[c] + channel);
#pragma unroll
          for (int i = 0; i < V; ++i) sum[i] += weight[c] * static_cast<acc_t>(corner.element[i]);
        }
      }
    }
    if (owns) {
      Vector<scalar_t, V> result;
#pragma unroll
      for (int i = 0; i < V; ++i) result.element[i] = static_cast<scalar_t>(sum[i]);
      store_vector<V>(output + query_head * p.channels + channel, result);
    }
  }
}

template <typename scalar_t>
struct Gradients {
  GlobalPointer<const scalar_t> grad_output;               // (N, Lq, M * D)
  GlobalPointer<at::opmath_type<scalar_t>> grad_value;     // (N, S, M, D) accumulator, zeroed; nullptr: not wanted
  GlobalPointer<scalar_t> grad_sampling_locations;         // (N, Lq, M, L, P, 2); nullptr (with the next): not wanted
  GlobalPointer<scalar_t> grad_attention_weights;          // (N, Lq, M, L, P)
};

// Lanes whose A-element atomics fill one 32-byte sector of the accumulator.
template <typename acc_t, int A>
constexpr int sector_lanes() {
  return 32 / static_cast<int>(A * sizeof(acc_t)) > 1 ? 32 / static_cast<int>(A * sizeof(acc_t)) : 1;
}

// The value gradient's layout for the atomics. In the loads' layout (V consecutive channels per lane) one atomic
// instruction of a group would spread over lanes * V channels with V - A of every V untouched: 4x the sectors for
// float32 with sm_80's scalar atomics, 2x for bfloat16 with sm_90's float4 ones. Instead, in each round (the lanes * V
// channels from round_base), blocks of `block` = min(sector_lanes, lanes) lanes take turns: atomic j of lane l adds
// the A elements at round_base + ((l / block) * (V / A) + j) * block * A + (l % block) * A, so every atomic
// instruction of a warp fills whole sectors, and atomic j of a lane lies j * block * A elements after its first: a
// constant (an immediate offset) when lanes >= sector_lanes. A lane holds its output gradient in this layout too.
struct AtomicLayout {
  int first;        // the channel of the lane's atomic 0
  unsigned inside;  // bit j: atomic j lies inside the D channels
};

template <int V, int A>
__device__ __forceinline__ AtomicLayout atomic_layout(int block, int lane, int round_base, int channels) {
  AtomicLayout layout;
  layout.first = round_base + ((lane / block) * (V / A) * block + lane % block) * A;
  layout.inside = 0;
#pragma unroll
  for (int j = 0; j < V / A; ++j) {
    if (layout.first + j * block * A < channels) layout.inside |= 1u << j;  // A divides D: all A inside, or none
  }
  return layout;
}

template <int V, int A, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_in_atomic_layout(GlobalPointer<const scalar_t> first, int block, unsigned inside,
                                                      acc_t (&gradient)[V]) {
#pragma unroll
  for (int j = 0; j < V / A; ++j) {
    const Vector<scalar_t, A> part = (inside >> j & 1u) ? load_vector<A>(first + j * block * A) : Vector<scalar_t, A>{};
#pragma unroll
    for (int t = 0; t < A; ++t) gradient[j * A + t] = static_cast<acc_t>(part.element[t]);
  }
}

// Adds scale * gradient (atomic layout) to one corner's value-gradient row, from the lane's first channel on;
// kEveryAtomicInside: no test of `inside` (a branch around each atomic).
template <int V, int A, bool kEveryAtomicInside, typename acc_t>
__device__ __forceinline__ void add_in_atomic_layout(GlobalPointer<acc_t> first, int block, unsigned inside,
                                                     acc_t scale, const acc_t (&gradient)[V]) {
#pragma unroll
  for (int j = 0; j < V / A; ++j) {
    acc_t values[A];
#pragma unroll
    for (int t = 0; t < A; ++t) values[t] = scale * gradient[j * A + t];
    if (kEveryAtomicInside || (inside >> j & 1u)) atomic_add<A>(first + j * block * A, values);
  }
}

// kSingleRound: every lane owns at most one channel vector (D <= 32 * V), held in registers for all samples.
// A: accumulator elements per atomic instruction (vector_atomic_width, or 1).
template <typename scalar_t, int V, bool kSingleRound, int A>
__device__ __forceinline__ void backward_body(const Problem<scalar_t>& p, const Gradients<scalar_t>& g) {
  using acc_t = at::opmath_type<scalar_t>;
  if (warp_is_idle(p)) return;
  const int lane = threadIdx.x & (p.lanes - 1);
  const int64_t group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> p.lanes_log2;
  const bool active = group < p.query_heads;
  const int64_t query_head = active ? group : 0;
  const int64_t batch = query_head / (static_cast<int64_t>(p.queries) * p.heads);
  const int head = static_cast<int>(query_head % p.heads);
  const int samples = p.levels * p.points;
  const int64_t value_base = (batch * p.positions * p.heads + head) * p.channels;
  const GlobalPointer<const scalar_t> value = p.value + value_base;
  const GlobalPointer<acc_t> grad_value = g.grad_value == nullptr ? nullptr : g.grad_value + value_base;
  const GlobalPointer<const scalar_t> grad_output = g.grad_output + query_head * p.channels;
  const GlobalPointer<const scalar_t> locations = p.sampling_locations + query_head * samples * 2;
  const GlobalPointer<const scalar_t> attention = p.attention_weights + query_head * samples;
  const bool want_sampling = g.grad_attention_weights != nullptr;
  const int chunks = p.channels / V;
  const int rounds = kSingleRound ? 1 : (chunks + p.lanes - 1) / p.lanes;
  constexpr int kSectorLanes = sector_lanes<acc_t, A>();
  const bool whole_blocks = p.lanes >= kSectorLanes;  // the atomics' stride is a constant
  const int block = whole_blocks ? kSectorLanes : p.lanes;
  // kSingleRound: this lane's output gradient, read once, in the loads' layout and in the atomics' layout
  Vector<scalar_t, V> held_grad;
  acc_t held_grad_for_atomics[V];
  const AtomicLayout single_layout = atomic_layout<V, A>(block, lane, 0, p.channels);
  if (kSingleRound && active) {
    if (lane < chunks) held_grad = load_vector<V>(grad_output + lane * V);
    if (grad_value != nullptr) {
      load_in_atomic_layout<V, A>(grad_output + single_layout.first, block, single_layout.inside,
                                  held_grad_for_atomics);
    }
  }
  for (int first = 0; first < samples; first += p.lanes) {
    const SampleCorners<acc_t> mine = sample_corners<scalar_t, acc_t>(p, active, first + lane, locations, attention);
    const int count = smaller(p.lanes, samples - first);
    for (int k = 0; k < count; ++k) {
      int offset[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) offset[c] = __shfl_sync(kFullWarp, mine.offset[c], k, p.lanes);
      const acc_t dh = __shfl_sync(kFullWarp, mine.frac_h, k, p.lanes);
      const acc_t dw = __shfl_sync(kFullWarp, mine.frac_w, k, p.lanes);
      const acc_t sample_attention = __shfl_sync(kFullWarp, mine.attention, k, p.lanes);
      const acc_t weight[4] = {(acc_t(1) - dh) * (acc_t(1) - dw), (acc_t(1) - dh) * dw, dh * (acc_t(1) - dw),
                               dh * dw};
      acc_t scale[4];  // d(output) / d(corner value) = attention * bilinear weight
#pragma unroll
      for (int c = 0; c < 4; ++c) scale[c] = sample_attention * weight[c];
      // dot[c] = sum over the lane's channels of grad_output * corner c: the three sample gradients are linear
      // in these four sums, so the per-channel work is one multiply-add per corner
      acc_t dot[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      for (int round = 0; round < rounds; ++round) {
        const int chunk = round * p.lanes + lane;
        if (want_sampling && active && chunk < chunks) {
          const int channel = chunk * V;
          const Vector<scalar_t, V> out_grad = kSingleRound ? held_grad : load_vector<V>(grad_output + channel);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (offset[c] < 0) continue;
            const Vector<scalar_t, V> corner = load_vector<V>(value + offset[c] + channel);
#pragma unroll
            for (int i = 0; i < V; ++i) {
              dot[c] += static_cast<acc_t>(out_grad.element[i]) * static_cast<acc_t>(corner.element[i]);
            }
          }
        }
        if (grad_value != nullptr && active) {
          const AtomicLayout layout =
              kSingleRound ? single_layout : atomic_layout<V, A>(block, lane, round * p.lanes * V, p.channels);
          acc_t grad_for_atomics[V];
          if (kSingleRound) {
#pragma unroll
            for (int i = 0; i < V; ++i) grad_for_atomics[i] = held_grad_for_atomics[i];
          } else {
            load_in_atomic_layout<V, A>(grad_output + layout.first, block, layout.inside, grad_for_atomics);
          }
          // the usual case (the round's lanes * V channels all inside D, lanes >= sector_lanes) with a constant
          // stride and no tests: immediate address offsets and a multiply per atomic (uniform across the warp)
          const bool usual = whole_blocks && (round + 1) * p.lanes * V <= p.channels;
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (offset[c] < 0 || (MSDA_MUTATION(kDropCorner3Atomic) && c == 3)) continue;
            const GlobalPointer<acc_t> first = grad_value + (offset[c] + layout.first);
            if (usual) {
              add_in_atomic_layout<V, A, true>(first, kSectorLanes, layout.inside, scale[c], grad_for_atomics);
            } else {
              add_in_atomic_layout<V, A, false>(first, block, layout.inside, scale[c], grad_for_atomics);
            }
          }
        }
      }
      acc_t grad_attention = weight[0] * dot[0] + weight[1] * dot[1] + weight[2] * dot[2] + weight[3] * dot[3];
      acc_t grad_w = (acc_t(1) - dh) * (dot[1] - dot[0]) + dh * (dot[3] - dot[2]);
      acc_t grad_h = (acc_t(1) - dw) * (dot[2] - dot[0]) + dw * (dot[3] - dot[1]);
      if (!want_sampling) continue;
      for (int step = p.lanes >> 1; step > 0; step >>= 1) {
        grad_attention += __shfl_xor_sync(kFullWarp, grad_attention, step, p.lanes);
        grad_w += __shfl_xor_sync(kFullWarp, grad_w, step, p.lanes);
        grad_h += __shfl_xor_sync(kFullWarp, grad_h, step, p.lanes);
      }
      if (lane == k && active) {  // the lane that computed the sample's geometry writes its gradients
        const int64_t sample = query_head * samples + first + k;
        // d(w)/d(x) = W and d(h)/d(y) = H for w = x * W - 0.5, h = y * H - 0.5; a skipped sample gets exact zeros
        const acc_t location_x = mine.inside ? mine.attention * grad_w * mine.width : acc_t(0);
        const acc_t location_y = mine.inside ? mine.attention * grad_h * mine.height : acc_t(0);
        store_scalar(g.grad_attention_weights + sample, static_cast<scalar_t>(mine.inside ? grad_attention : acc_t(0)));
        store_scalar(g.grad_sampling_locations + 2 * sample, static_cast<scalar_t>(location_x));
        store_scalar(g.grad_sampling_locations + 2 * sample + 1, static_cast<scalar_t>(location_y));
      }
    }
  }
}

template <typename scalar_t, int V, bool kSingleRound>
__global__ void __launch_bounds__(kThreads) backward_kernel(Problem<scalar_t> p, Gradients<scalar_t> g) {
  constexpr int kVectorWidth = vector_atomic_width<at::opmath_type<scalar_t>, V>();
#if MSDA_HAS_VECTOR_ATOMICS
  if constexpr (kVectorWidth > 1) {
    if (MSDA_USE_VECTOR_ATOMICS) {
      backward_body<scalar_t, V, kSingleRound, kVectorWidth>(p, g);
      return;
    }
  }
#endif
  backward_body<scalar_t, V, kSingleRound, 1>(p, g);
}

// ---- host side: checks, launch plan, dispatch. `Launcher` runs a kernel: on the GPU, or in the emulation.

// What a kernel does with a tensor it is given (the emulation checks it; the GPU launcher ignores it). output:
// every element written by the kernel; accumulator: initialised by the host, added to by the kernel.
enum class Role { kInput, kOutput, kAccumulator };
struct Binding {
  const char* name;  // the argument's name
  at::Tensor tensor;
  Role role;
};

struct LaunchPlan {
  int vector_width;  // V
  int lanes;         // lanes per (batch, query, head)
  int lanes_log2;
  int64_t blocks;
};

// The widest V (16 bytes at most) that divides D and keeps every pointer aligned, and the group size.
inline LaunchPlan plan_launch(const Sizes& s, size_t element_size, std::initializer_list<const void*> pointers) {
  const int64_t slice = s.positions * s.heads * s.channels;
  TORCH_CHECK_VALUE(slice <= std::numeric_limits<int32_t>::max(),
                    "the CUDA kernel of ms_deform_attn indexes one batch item of value (S * M * D = ", slice,
                    " elements) with int32, at most 2^31 - 1 elements: use smaller feature maps or backend=\"pytorch\"");
  int width = static_cast<int>(16 / element_size);
  auto fits = [&](int v) {
    if (s.channels % v != 0) return false;
    for (const void* pointer : pointers) {
      if (pointer != nullptr && reinterpret_cast<uintptr_t>(pointer) % (v * element_size) != 0) return false;
    }
    return true;
  };
  while (width > 1 && !fits(width)) width /= 2;
  const int64_t chunks = s.channels / width;
  int lanes = 1, lanes_log2 = 0;
  while (lanes < chunks && lanes < 32) {
    lanes *= 2;
    ++lanes_log2;
  }
  const int64_t query_heads = s.batch * s.queries * s.heads;
  const int64_t groups_per_block = kThreads / lanes;
  const int64_t blocks = (query_heads + groups_per_block - 1) / groups_per_block;
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), "ms_deform_attn: too many queries for one launch");
  return {width, lanes, lanes_log2, blocks};
}

template <typename scalar_t>
Problem<scalar_t> make_problem(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights, const Sizes& s, const LaunchPlan& plan) {
  return {value.data_ptr<scalar_t>(),
          spatial_shapes.data_ptr<int64_t>(),
          level_start_index.data_ptr<int64_t>(),
          sampling_locations.data_ptr<scalar_t>(),
          attention_weights.data_ptr<scalar_t>(),
          s.batch * s.queries * s.heads,
          static_cast<int>(s.positions),
          static_cast<int>(s.heads),
          static_cast<int>(s.channels),
          static_cast<int>(s.queries),
          static_cast<int>(s.levels),
          static_cast<int>(s.points),
          plan.lanes,
          plan.lanes_log2};
}

// Calls f(std::integral_constant<int, V>) for the runtime vector width, instantiating only widths of <= 16 bytes.
template <typename scalar_t, typename F>
void dispatch_vector_width(int width, F&& f) {
  constexpr int kWidest = static_cast<int>(16 / sizeof(scalar_t));
  if constexpr (kWidest >= 8) {
    if (width == 8) return f(std::integral_constant<int, 8>{});
  }
  if constexpr (kWidest >= 4) {
    if (width == 4) return f(std::integral_constant<int, 4>{});
  }
  if (width == 2) return f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 1>{});
}

inline void check_levels_and_points_fit(const Sizes& s) {
  TORCH_CHECK_VALUE(s.levels * s.points <= std::numeric_limits<int32_t>::max() / 2 &&
                        s.heads * s.channels <= std::numeric_limits<int32_t>::max(),
                    "ms_deform_attn: levels * points or heads * channels too large for the CUDA kernel");
}

template <typename Launcher>
at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_levels_and_points_fit(s);
  at::Tensor output = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());
  if (output.numel() == 0) return output;
  Launcher::bind({{"value", value, Role::kInput},
                  {"spatial_shapes", spatial_shapes, Role::kInput},
                  {"level_start_index", level_start_index, Role::kInput},
                  {"sampling_locations", sampling_locations, Role::kInput},
                  {"attention_weights", attention_weights, Role::kInput},
                  {"output", output, Role::kOutput}});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    const LaunchPlan plan = plan_launch(s, sizeof(scalar_t), {value.data_ptr(), output.data_ptr()});
    const Problem<scalar_t> problem =
        make_problem<scalar_t>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, s, plan);
    dispatch_vector_width<scalar_t>(plan.vector_width, [&](auto width) {
      Launcher::launch(forward_kernel<scalar_t, decltype(width)::value>, plan.blocks, kThreads, problem,
                       output.data_ptr<scalar_t>());
    });
  });
  return output;
}

// output_mask: which of (grad_value, grad_sampling_locations, grad_attention_weights) to compute; a gradient
// not asked for is returned as an empty tensor of shape (0,) and costs nothing. The location and weight
// gradients come from the same reductions, so asking for either computes both.
template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& value,
                                                        const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights,
                                                        std::array<bool, 3> output_mask) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_levels_and_points_fit(s);
  const at::Tensor grad = grad_output.contiguous();
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({s.batch, s.queries, s.heads * s.channels}),
                    "grad_output must be (N, Lq, M * D), got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == value.scalar_type(), "grad_output must have value's dtype");
  TORCH_CHECK_VALUE(grad.device() == value.device(), "grad_output must be on value's device");
  const bool want_value = output_mask[0];
  const bool want_sampling = output_mask[1] || output_mask[2];
  const at::Tensor nothing = at::empty({0}, value.options());
  at::Tensor grad_value = want_value
                              ? at::zeros(value.sizes(), value.options().dtype(at::toOpMathType(value.scalar_type())))
                              : at::Tensor();
  at::Tensor grad_sampling_locations = want_sampling ? at::empty_like(sampling_locations) : at::Tensor();
  at::Tensor grad_attention_weights = want_sampling ? at::empty_like(attention_weights) : at::Tensor();
  const int64_t samples = attention_weights.numel();
  if (samples > 0 && (want_value || want_sampling)) {
    if (want_value) {  // atomics make the value gradient's rounding depend on the order threads run in
      at::globalContext().alertNotDeterministic("ms_deform_attn_backward (CUDA kernel, value gradient)");
    }
    std::vector<Binding> bindings{{"grad_output", grad, Role::kInput},
                                  {"value", value, Role::kInput},
                                  {"spatial_shapes", spatial_shapes, Role::kInput},
                                  {"level_start_index", level_start_index, Role::kInput},
                                  {"sampling_locations", sampling_locations, Role::kInput},
                                  {"attention_weights", attention_weights, Role::kInput}};
    if (want_value) bindings.push_back({"grad_value", grad_value, Role::kAccumulator});
    if (want_sampling) {
      bindings.push_back({"grad_sampling_locations", grad_sampling_locations, Role::kOutput});
      bindings.push_back({"grad_attention_weights", grad_attention_weights, Role::kOutput});
    }
    Launcher::bind(bindings);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const LaunchPlan plan = plan_launch(s, sizeof(scalar_t), {value.data_ptr(), grad.data_ptr()});
      const Problem<scalar_t> problem = make_problem<scalar_t>(value, spatial_shapes, level_start_index,
                                                               sampling_locations, attention_weights, s, plan);
      const Gradients<scalar_t> gradients{
          grad.data_ptr<scalar_t>(), want_value ? grad_value.data_ptr<acc_t>() : nullptr,
          want_sampling ? grad_sampling_locations.data_ptr<scalar_t>() : nullptr,
          want_sampling ? grad_attention_weights.data_ptr<scalar_t>() : nullptr};
      const bool single_round = s.channels <= 32 * plan.vector_width;
      dispatch_vector_width<scalar_t>(plan.vector_width, [&](auto width) {
        constexpr int V = decltype(width)::value;
        if (single_round) {
          Launcher::launch(backward_kernel<scalar_t, V, true>, plan.blocks, kThreads, problem, gradients);
        } else {
          Launcher::launch(backward_kernel<scalar_t, V, false>, plan.blocks, kThreads, problem, gradients);
        }
      });
    });
  } else {
    if (want_sampling) {
      grad_sampling_locations.zero_();
      grad_attention_weights.zero_();
    }
  }
  return {want_value ? grad_value.to(value.scalar_type()) : nothing,
          output_mask[1] ? grad_sampling_locations : nothing, output_mask[2] ? grad_attention_weights : nothing};
}

}  // namespace cuda_kernels
}  // namespace deformable_detr
