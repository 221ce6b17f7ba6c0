// Last-line argument checks of the kernels' host code. Python validates first and names arguments in detail;
// these guard direct calls through torch.ops so that a kernel never runs on a layout it does not expect.
#pragma once

#include <ATen/ATen.h>

namespace deformable_detr {

struct Sizes {
  int64_t batch, positions, heads, channels, queries, levels, points;
};

// float_coordinates: sampling_locations and attention_weights may also be float32 when value is half precision
// (the CPU forward's mixed inference path); otherwise all three share one dtype.
inline Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                          const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                          const at::Tensor& attention_weights, bool float_coordinates = false) {
  TORCH_CHECK_VALUE(value.dim() == 4, "value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
                    "spatial_shapes must be (L, 2), got ", spatial_shapes.sizes());
  TORCH_CHECK_VALUE(sampling_locations.dim() == 6, "sampling_locations must be (N, Lq, M, L, P, 2), got ",
                    sampling_locations.sizes());
  const Sizes s{value.size(0), value.size(1), value.size(2), value.size(3),
                sampling_locations.size(1), spatial_shapes.size(0), sampling_locations.size(4)};
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == s.levels,
                    "level_start_index must be (L,), got ", level_start_index.sizes());
  TORCH_CHECK_VALUE(sampling_locations.sizes() ==
                        at::IntArrayRef({s.batch, s.queries, s.heads, s.levels, s.points, 2}),
                    "sampling_locations must be (N, Lq, M, L, P, 2), got ", sampling_locations.sizes());
  TORCH_CHECK_VALUE(attention_weights.sizes() == at::IntArrayRef({s.batch, s.queries, s.heads, s.levels, s.points}),
                    "attention_weights must be (N, Lq, M, L, P), got ", attention_weights.sizes());
  TORCH_CHECK_TYPE(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
                   "spatial_shapes and level_start_index must be int64");
  const bool half_value = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  const at::ScalarType coordinates = sampling_locations.scalar_type();
  TORCH_CHECK_TYPE(attention_weights.scalar_type() == coordinates &&
                       (coordinates == value.scalar_type() ||
                        (float_coordinates && half_value && coordinates == at::kFloat)),
                   "value, sampling_locations and attention_weights must share one dtype",
                   float_coordinates ? " (or float32 locations and weights with a half-precision value)" : "");
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK_VALUE(t->is_contiguous(), "multi-scale deformable attention inputs must be contiguous");
    TORCH_CHECK_VALUE(t->device() == value.device(), "all inputs must be on value's device");
  }
  return s;
}

}  // namespace deformable_detr
