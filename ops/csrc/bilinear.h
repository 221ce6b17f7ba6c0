// Bilinear sampling geometry shared by the CPU and CUDA kernels of multi-scale deformable attention.
//
// A sampling location (x, y) in [0, 1] maps to the pixel coordinate (x * W - 0.5, y * H - 0.5), the convention of
// grid_sample with align_corners=False. The four neighbouring pixels are weighted bilinearly; a neighbour outside
// the H x W map contributes zero (zero padding).
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

// The CUDA emulation's mutant build (tests only) switches deliberate defects on; a constant false everywhere else.
#ifndef MSDA_MUTATION
#define MSDA_MUTATION(name) false
#endif

namespace deformable_detr {

C10_HOST_DEVICE inline float floor_of(float v) { return floorf(v); }
C10_HOST_DEVICE inline double floor_of(double v) { return floor(v); }

// index_t is int64_t on the CPU; the CUDA kernels use int32_t, after the host checked that every position fits.
template <typename acc_t, typename index_t = int64_t>
struct BilinearCorners {
  index_t position[4];  // row-major h * W + w inside the level, -1 for a neighbour outside the map
  acc_t weight[4];      // (1-dh)(1-dw), (1-dh)dw, dh(1-dw), dh dw for top-left, top-right, bottom-left, bottom-right
  acc_t frac_h;         // dh: fractional part of the row coordinate
  acc_t frac_w;         // dw: fractional part of the column coordinate
};

// Fills `corners` and returns true when the location touches the map at all; false means the sample is zero.
template <typename acc_t, typename index_t = int64_t>
C10_HOST_DEVICE inline bool bilinear_corners(acc_t x, acc_t y, index_t height, index_t width,
                                             BilinearCorners<acc_t, index_t>& corners) {
  const acc_t h = y * static_cast<acc_t>(height) - acc_t(0.5);
  const acc_t w = x * static_cast<acc_t>(width) - acc_t(0.5);
  // Also false for NaN coordinates, so a NaN location never turns into an index.
  if (!(h > acc_t(-1) && w > acc_t(-1) && h < static_cast<acc_t>(height) && w < static_cast<acc_t>(width))) {
    return false;
  }
  const acc_t h_floor = floor_of(h);
  const acc_t w_floor = floor_of(w);
  const index_t h_low = static_cast<index_t>(h_floor);
  const index_t w_low = static_cast<index_t>(w_floor);
  const acc_t dh = h - h_floor;
  const acc_t dw = w - w_floor;
  corners.frac_h = dh;
  corners.frac_w = dw;
  const bool top = h_low >= 0;
  const bool bottom = h_low + 1 <= height - 1;
  const bool left = w_low >= 0;
  const bool right = MSDA_MUTATION(kRightBorder) ? w_low + 1 <= width : w_low + 1 <= width - 1;
  corners.position[0] = (top && left) ? h_low * width + w_low : -1;
  corners.position[1] = (top && right) ? h_low * width + w_low + 1 : -1;
  corners.position[2] = (bottom && left) ? (h_low + 1) * width + w_low : -1;
  corners.position[3] = (bottom && right) ? (h_low + 1) * width + w_low + 1 : -1;
  corners.weight[0] = (acc_t(1) - dh) * (acc_t(1) - dw);
  corners.weight[1] = (acc_t(1) - dh) * dw;
  corners.weight[2] = dh * (acc_t(1) - dw);
  corners.weight[3] = dh * dw;
  return true;
}

// True when level `level` lies inside the S positions of value; kernels skip a level that does not, so that a
// malformed spatial_shapes/level_start_index can never make them read or write out of bounds.
// Int64Pointer: const int64_t*, or anything indexed like it (the CUDA emulation's pointers check every read).
template <typename Int64Pointer>
C10_HOST_DEVICE inline bool level_in_bounds(Int64Pointer spatial_shapes, Int64Pointer level_start_index,
                                            int64_t level, int64_t num_positions) {
  const int64_t height = spatial_shapes[2 * level];
  const int64_t width = spatial_shapes[2 * level + 1];
  const int64_t start = level_start_index[level];
  return height > 0 && width > 0 && start >= 0 && start + height * width <= num_positions;
}

C10_HOST_DEVICE inline bool level_in_bounds(const int64_t* spatial_shapes, const int64_t* level_start_index,
                                            int64_t level, int64_t num_positions) {
  return level_in_bounds<const int64_t*>(spatial_shapes, level_start_index, level, num_positions);
}

}  // namespace deformable_detr
