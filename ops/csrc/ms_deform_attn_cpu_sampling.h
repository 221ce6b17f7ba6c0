// Sampling geometry of the CPU kernels of multi-scale deformable attention (CPU only; the CUDA kernels use
// bilinear.h): the bilinear corners of many samples at once, in loops the compiler vectorises.
//
// A sample's location (x, y) in [0, 1] maps to the pixel coordinate (x * W - 0.5, y * H - 0.5) of its level, as in
// bilinear.h (grid_sample with align_corners=False, zero padding). The kernels take a query's samples in the order
// of sampling_locations, sample j = (head * L + level) * P + point, and compute their geometry in one loop over j
// before the loops over channels.
//
// The loops vectorise when compiled with -fno-trapping-math (ops/build.py passes it): they compute both arms of
// every selection, which IEEE trapping semantics would forbid.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <vector>

#include "bilinear.h"
#include "checks.h"

namespace deformable_detr {

// What every sample j of a query needs to know of its level and head, for j in [0, M * L * P).
template <typename acc_t>
struct SampleLevels {
  std::vector<acc_t> width, height;             // W and H; -1 for a level outside value, which nothing touches
  std::vector<int32_t> width_rows;              // W: positions between a pixel and the one below it
  std::vector<int32_t> last_row, last_column;   // H - 1 and W - 1
  std::vector<int32_t> level_start;             // the level's first position in S
  std::vector<int64_t> head_offset;             // head * D: the head's channels in a value row

  SampleLevels(const int64_t* spatial_shapes, const int64_t* level_start_index, const Sizes& s) {
    const int64_t count = s.heads * s.levels * s.points;
    for (auto* column : {&width_rows, &last_row, &last_column, &level_start}) column->resize(count);
    width.resize(count), height.resize(count), head_offset.resize(count);
    for (int64_t j = 0; j < count; ++j) {
      const int64_t level = (j / s.points) % s.levels, head = j / (s.points * s.levels);
      const bool inside = level_in_bounds(spatial_shapes, level_start_index, level, s.positions);
      const int64_t h = spatial_shapes[2 * level], w = spatial_shapes[2 * level + 1];
      // -1 > h > -1 holds for no h: a level outside value is never touched, and its sizes never used
      height[j] = inside ? static_cast<acc_t>(h) : acc_t(-1);
      width[j] = inside ? static_cast<acc_t>(w) : acc_t(-1);
      width_rows[j] = inside ? static_cast<int32_t>(w) : 0;
      last_row[j] = inside ? static_cast<int32_t>(h - 1) : 0;
      last_column[j] = inside ? static_cast<int32_t>(w - 1) : 0;
      level_start[j] = inside ? static_cast<int32_t>(level_start_index[level]) : 0;
      head_offset[j] = head * s.channels;
    }
  }
};

// The bilinear corners of a run of samples, i = 0 .. count - 1.
template <typename acc_t>
struct SampleGeometry {
  std::vector<acc_t> weight[4];       // bilinear weight of each corner, 0 for a corner outside the map
  std::vector<acc_t> scaled[4];       // the same times the sample's attention weight
  std::vector<acc_t> frac_h, frac_w;  // dh, dw: the fractional parts of the pixel coordinate
  std::vector<int32_t> position;      // the top-left corner's position in S (meaningless if corners == 0)
  std::vector<int32_t> corners;       // bit c set: corner c lies inside the map (top-left, top-right, bottom-left,
                                      // bottom-right); 0: the sample touches nothing and is skipped

  explicit SampleGeometry(int64_t capacity) {
    for (auto& column : weight) column.resize(capacity);
    for (auto& column : scaled) column.resize(capacity);
    frac_h.resize(capacity), frac_w.resize(capacity), position.resize(capacity), corners.resize(capacity);
  }
};

// Geometry of samples first .. first + count - 1 of a query (indices into `levels`); `locations` (count, 2) and
// `attention` (count) are theirs. kBilinear: also fill SampleGeometry::weight and frac_h / frac_w (the backward
// needs them; the forward only the scaled weights).
template <bool kBilinear, typename scalar_t, typename acc_t>
inline void locate_samples(const scalar_t* __restrict__ locations, const scalar_t* __restrict__ attention,
                           int64_t first, int64_t count, const SampleLevels<acc_t>& levels,
                           SampleGeometry<acc_t>& geometry) {
  const acc_t* __restrict__ width = levels.width.data() + first;
  const acc_t* __restrict__ height = levels.height.data() + first;
  const int32_t* __restrict__ width_rows = levels.width_rows.data() + first;
  const int32_t* __restrict__ last_row = levels.last_row.data() + first;
  const int32_t* __restrict__ last_column = levels.last_column.data() + first;
  const int32_t* __restrict__ level_start = levels.level_start.data() + first;
  acc_t* __restrict__ weight0 = geometry.weight[0].data();
  acc_t* __restrict__ weight1 = geometry.weight[1].data();
  acc_t* __restrict__ weight2 = geometry.weight[2].data();
  acc_t* __restrict__ weight3 = geometry.weight[3].data();
  acc_t* __restrict__ scaled0 = geometry.scaled[0].data();
  acc_t* __restrict__ scaled1 = geometry.scaled[1].data();
  acc_t* __restrict__ scaled2 = geometry.scaled[2].data();
  acc_t* __restrict__ scaled3 = geometry.scaled[3].data();
  acc_t* __restrict__ frac_h = geometry.frac_h.data();
  acc_t* __restrict__ frac_w = geometry.frac_w.data();
  int32_t* __restrict__ position = geometry.position.data();
  int32_t* __restrict__ corners = geometry.corners.data();
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    acc_t h = static_cast<acc_t>(locations[2 * i + 1]) * height[i] - acc_t(0.5);
    acc_t w = static_cast<acc_t>(locations[2 * i]) * width[i] - acc_t(0.5);
    // False for NaN coordinates too; an untouched sample continues from (0, 0), so nothing NaN reaches an index.
    const bool touches = (h > acc_t(-1)) & (w > acc_t(-1)) & (h < height[i]) & (w < width[i]);
    h = touches ? h : acc_t(0);
    w = touches ? w : acc_t(0);
    // floor(h) for h > -1, without the call the vectoriser may refuse
    int32_t h_low = static_cast<int32_t>(h), w_low = static_cast<int32_t>(w);
    h_low -= static_cast<acc_t>(h_low) > h;
    w_low -= static_cast<acc_t>(w_low) > w;
    const acc_t dh = h - static_cast<acc_t>(h_low), dw = w - static_cast<acc_t>(w_low);
    const int32_t top = touches & (h_low >= 0), bottom = touches & (h_low < last_row[i]);
    const int32_t left = w_low >= 0, right = w_low < last_column[i];
    const int32_t inside = (top & left) | (top & right) << 1 | (bottom & left) << 2 | (bottom & right) << 3;
    const acc_t w0 = (acc_t(1) - dh) * (acc_t(1) - dw), w1 = (acc_t(1) - dh) * dw, w2 = dh * (acc_t(1) - dw),
                w3 = dh * dw;
    const acc_t a = static_cast<acc_t>(attention[i]);
    const acc_t a0 = a * w0, a1 = a * w1, a2 = a * w2, a3 = a * w3;
    scaled0[i] = (inside & 1) ? a0 : acc_t(0);
    scaled1[i] = (inside & 2) ? a1 : acc_t(0);
    scaled2[i] = (inside & 4) ? a2 : acc_t(0);
    scaled3[i] = (inside & 8) ? a3 : acc_t(0);
    if (kBilinear) {
      weight0[i] = (inside & 1) ? w0 : acc_t(0);
      weight1[i] = (inside & 2) ? w1 : acc_t(0);
      weight2[i] = (inside & 4) ? w2 : acc_t(0);
      weight3[i] = (inside & 8) ? w3 : acc_t(0);
      frac_h[i] = dh;
      frac_w[i] = dw;
    }
    position[i] = level_start[i] + h_low * width_rows[i] + w_low;
    corners[i] = inside;
  }
}

// Row pointers of the corners of samples first .. first + count - 1 (located by locate_samples): corner c of sample
// i is base + (position - position_shift) * row_stride (+ head_offset with kHeadOffset), or `outside` when the
// corner lies outside the map. T is const for value rows, mutable for gradient rows.
template <bool kHeadOffset, typename T, typename acc_t>
inline void corner_rows(const SampleGeometry<acc_t>& geometry, const SampleLevels<acc_t>& levels, int64_t first,
                        int64_t count, T* base, int64_t row_stride, int64_t position_shift, T* outside,
                        T** rows[4]) {
  const int32_t* __restrict__ width_rows = levels.width_rows.data() + first;
  const int64_t* __restrict__ head_offset = levels.head_offset.data() + first;
  const int32_t* __restrict__ position = geometry.position.data();
  const int32_t* __restrict__ corners = geometry.corners.data();
  T** __restrict__ row0 = rows[0];
  T** __restrict__ row1 = rows[1];
  T** __restrict__ row2 = rows[2];
  T** __restrict__ row3 = rows[3];
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const int64_t inside = corners[i];
    const int64_t top_left = (static_cast<int64_t>(position[i]) - position_shift) * row_stride +
                             (kHeadOffset ? head_offset[i] : int64_t(0));
    const int64_t bottom_left = top_left + static_cast<int64_t>(width_rows[i]) * row_stride;
    // offsets of corners outside the map are never added to base: no pointer leaves the tensor
    row0[i] = (inside & 1) ? base + top_left : outside;
    row1[i] = (inside & 2) ? base + (top_left + row_stride) : outside;
    row2[i] = (inside & 4) ? base + bottom_left : outside;
    row3[i] = (inside & 8) ? base + (bottom_left + row_stride) : outside;
  }
}

// Storage for the four row pointers of `capacity` samples, in the form corner_rows fills.
template <typename T>
struct CornerRows {
  std::vector<T*> storage[4];
  T** rows[4];

  explicit CornerRows(int64_t capacity) {
    for (int c = 0; c < 4; ++c) storage[c].resize(capacity), rows[c] = storage[c].data();
  }
};

}  // namespace deformable_detr
