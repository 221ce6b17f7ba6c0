// CPU kernels of multi-scale deformable attention, registered as implementations of the torch.library ops
// deformable_detr::ms_deform_attn_forward / ms_deform_attn_backward (schemas are defined in ops/custom_ops.py).
//
// Layouts (all contiguous): value (N, S, M, D); spatial_shapes (L, 2) int64 (H, W); level_start_index (L,) int64;
// sampling_locations (N, Lq, M, L, P, 2) as (x, y) in [0, 1]; attention_weights (N, Lq, M, L, P);
// output (N, Lq, M * D). Half and bfloat16 accumulate in float32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "bilinear.h"
#include "checks.h"

namespace deformable_detr {
namespace {

// Points the four corners of a sample at their value rows; a corner outside the map reads `zeros`.
template <typename scalar_t, typename acc_t>
inline void corner_rows(const BilinearCorners<acc_t>& corners, const scalar_t* level_value, int64_t row_stride,
                        const scalar_t* zeros, const scalar_t* rows[4]) {
  for (int c = 0; c < 4; ++c) {
    rows[c] = corners.position[c] >= 0 ? level_value + corners.position[c] * row_stride : zeros;
  }
}

template <typename scalar_t>
void forward_kernel(const scalar_t* value, const int64_t* spatial_shapes, const int64_t* level_start_index,
                    const scalar_t* sampling_locations, const scalar_t* attention_weights, scalar_t* output,
                    const Sizes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row_stride = s.heads * s.channels;  // distance between two positions of one head in value
  const int64_t grain = std::max<int64_t>(1, 2048 / (s.heads * s.levels * s.points));
  at::parallel_for(0, s.batch * s.queries, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> accumulator(s.channels);
    const std::vector<scalar_t> zeros(s.channels, scalar_t(0));
    for (int64_t batch_query = begin; batch_query < end; ++batch_query) {
      const int64_t batch = batch_query / s.queries;
      for (int64_t head = 0; head < s.heads; ++head) {
        std::fill(accumulator.begin(), accumulator.end(), acc_t(0));
        const int64_t sample_base = (batch_query * s.heads + head) * s.levels * s.points;
        for (int64_t level = 0; level < s.levels; ++level) {
          if (!level_in_bounds(spatial_shapes, level_start_index, level, s.positions)) continue;
          const int64_t height = spatial_shapes[2 * level], width = spatial_shapes[2 * level + 1];
          const scalar_t* level_value =
              value + ((batch * s.positions + level_start_index[level]) * s.heads + head) * s.channels;
          for (int64_t point = 0; point < s.points; ++point) {
            const int64_t sample = sample_base + level * s.points + point;
            BilinearCorners<acc_t> corners;
            if (!bilinear_corners<acc_t>(sampling_locations[2 * sample], sampling_locations[2 * sample + 1],
                                         height, width, corners)) {
              continue;
            }
            const acc_t attention = attention_weights[sample];
            const scalar_t* rows[4];
            corner_rows(corners, level_value, row_stride, zeros.data(), rows);
            const acc_t w0 = attention * corners.weight[0], w1 = attention * corners.weight[1];
            const acc_t w2 = attention * corners.weight[2], w3 = attention * corners.weight[3];
            acc_t* __restrict__ sum = accumulator.data();
#pragma omp simd
            for (int64_t d = 0; d < s.channels; ++d) {
              sum[d] += w0 * static_cast<acc_t>(rows[0][d]) + w1 * static_cast<acc_t>(rows[1][d]) +
                                w2 * static_cast<acc_t>(rows[2][d]) + w3 * static_cast<acc_t>(rows[3][d]);
            }
          }
        }
        scalar_t* out = output + (batch_query * s.heads + head) * s.channels;
        for (int64_t d = 0; d < s.channels; ++d) out[d] = static_cast<scalar_t>(accumulator[d]);
      }
    }
  });
}

// Work is split by (batch, head), and also by level when that gives too few tasks for the threads: the value
// rows a task scatters into belong to it alone, so the scatter needs no atomics, and the location and weight
// gradients of each sample are written once. The split and the order of the additions into a row do not depend
// on the thread count, so the results are bitwise deterministic. One pass over the channels does the gathers, the
// reductions and the scatter; kGradValue / kGradSampling drop the scatter / the gathers and reductions that
// nobody asked for. A sample wholly outside its map is skipped: its gradients stay exactly 0.
template <typename scalar_t, bool kGradValue, bool kGradSampling>
void backward_kernel(const scalar_t* grad_output, const scalar_t* value, const int64_t* spatial_shapes,
                     const int64_t* level_start_index, const scalar_t* sampling_locations,
                     const scalar_t* attention_weights, at::opmath_type<scalar_t>* grad_value,
                     scalar_t* grad_sampling_locations, scalar_t* grad_attention_weights, const Sizes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row_stride = s.heads * s.channels;
  const int64_t level_groups = s.batch * s.heads >= 2 * at::get_num_threads() ? 1 : s.levels;
  const int64_t levels_per_group = (s.levels + level_groups - 1) / level_groups;
  at::parallel_for(0, s.batch * s.heads * level_groups, 1, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zeros(s.channels, scalar_t(0));
    std::vector<acc_t> discard(s.channels);  // gradient sink of corners outside the map
    for (int64_t task = begin; task < end; ++task) {
      const int64_t first_level = (task % level_groups) * levels_per_group;
      const int64_t last_level = std::min(s.levels, first_level + levels_per_group);
      const int64_t head = (task / level_groups) % s.heads;
      const int64_t batch = task / (level_groups * s.heads);
      for (int64_t query = 0; query < s.queries; ++query) {
        const int64_t batch_query_head = (batch * s.queries + query) * s.heads + head;
        const scalar_t* grad_out = grad_output + batch_query_head * s.channels;
        for (int64_t level = first_level; level < last_level; ++level) {
          if (!level_in_bounds(spatial_shapes, level_start_index, level, s.positions)) continue;
          const int64_t height = spatial_shapes[2 * level], width = spatial_shapes[2 * level + 1];
          const int64_t level_offset =
              ((batch * s.positions + level_start_index[level]) * s.heads + head) * s.channels;
          const scalar_t* level_value = value + level_offset;
          acc_t* level_grad = kGradValue ? grad_value + level_offset : nullptr;
          for (int64_t point = 0; point < s.points; ++point) {
            const int64_t sample = (batch_query_head * s.levels + level) * s.points + point;
            BilinearCorners<acc_t> corners;
            if (!bilinear_corners<acc_t>(sampling_locations[2 * sample], sampling_locations[2 * sample + 1],
                                         height, width, corners)) {
              continue;
            }
            const acc_t attention = attention_weights[sample];
            const acc_t w0 = corners.weight[0], w1 = corners.weight[1], w2 = corners.weight[2],
                        w3 = corners.weight[3];
            if constexpr (kGradValue) {
              acc_t* grad_rows[4];
              for (int c = 0; c < 4; ++c) {
                grad_rows[c] =
                    corners.position[c] >= 0 ? level_grad + corners.position[c] * row_stride : discard.data();
              }
              acc_t *g0 = grad_rows[0], *g1 = grad_rows[1], *g2 = grad_rows[2], *g3 = grad_rows[3];
              const acc_t s0 = attention * w0, s1 = attention * w1, s2 = attention * w2, s3 = attention * w3;
#pragma omp simd
              for (int64_t d = 0; d < s.channels; ++d) {
                const acc_t g = static_cast<acc_t>(grad_out[d]);
                g0[d] += s0 * g;  // distinct rows, except corners outside the map that all write `discard`
                g1[d] += s1 * g;
                g2[d] += s2 * g;
                g3[d] += s3 * g;
              }
            }
            if constexpr (kGradSampling) {
              const scalar_t* rows[4];
              corner_rows(corners, level_value, row_stride, zeros.data(), rows);
              const scalar_t *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];
              const acc_t dh = corners.frac_h, dw = corners.frac_w;
              acc_t grad_attention = 0, grad_h = 0, grad_w = 0;
#pragma omp simd reduction(+ : grad_attention, grad_h, grad_w)
              for (int64_t d = 0; d < s.channels; ++d) {
                const acc_t g = static_cast<acc_t>(grad_out[d]);
                const acc_t v0 = r0[d], v1 = r1[d], v2 = r2[d], v3 = r3[d];
                grad_attention += g * (w0 * v0 + w1 * v1 + w2 * v2 + w3 * v3);
                grad_w += g * ((acc_t(1) - dh) * (v1 - v0) + dh * (v3 - v2));
                grad_h += g * ((acc_t(1) - dw) * (v2 - v0) + dw * (v3 - v1));
              }
              grad_attention_weights[sample] = static_cast<scalar_t>(grad_attention);
              // d(w)/d(x) = W and d(h)/d(y) = H for w = x * W - 0.5, h = y * H - 0.5
              grad_sampling_locations[2 * sample] = static_cast<scalar_t>(attention * grad_w * width);
              grad_sampling_locations[2 * sample + 1] = static_cast<scalar_t>(attention * grad_h * height);
            }
          }
        }
      }
    }
  });
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  at::Tensor output = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                             level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
                             attention_weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), s);
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
  const at::Tensor grad = grad_output.contiguous();
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({s.batch, s.queries, s.heads * s.channels}),
                    "grad_output must be (N, Lq, M * D), got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == value.scalar_type(), "grad_output must have value's dtype");
  const bool want_value = output_mask[0];
  const bool want_sampling = output_mask[1] || output_mask[2];
  const auto accumulate_type = at::toOpMathType(value.scalar_type());
  const at::Tensor nothing = at::empty({0}, value.options());
  at::Tensor grad_value = want_value ? at::zeros(value.sizes(), value.options().dtype(accumulate_type)) : at::Tensor();
  at::Tensor grad_sampling_locations = want_sampling ? at::zeros_like(sampling_locations) : at::Tensor();
  at::Tensor grad_attention_weights = want_sampling ? at::zeros_like(attention_weights) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto kernel) {
      kernel(grad.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
             level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
             attention_weights.data_ptr<scalar_t>(), want_value ? grad_value.data_ptr<acc_t>() : nullptr,
             want_sampling ? grad_sampling_locations.data_ptr<scalar_t>() : nullptr,
             want_sampling ? grad_attention_weights.data_ptr<scalar_t>() : nullptr, s);
    };
    if (want_value && want_sampling) {
      run(backward_kernel<scalar_t, true, true>);
    } else if (want_value) {
      run(backward_kernel<scalar_t, true, false>);
    } else if (want_sampling) {
      run(backward_kernel<scalar_t, false, true>);
    }
  });
  return {want_value ? grad_value.to(value.scalar_type()) : nothing,
          output_mask[1] ? grad_sampling_locations : nothing, output_mask[2] ? grad_attention_weights : nothing};
}

}  // namespace
}  // namespace deformable_detr

TORCH_LIBRARY_IMPL(deformable_detr, CPU, m) {
  m.impl("ms_deform_attn_forward", &deformable_detr::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &deformable_detr::ms_deform_attn_backward_cpu);
}
