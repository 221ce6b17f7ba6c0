// CUDA kernels of multi-scale deformable attention, registered as the CUDA implementations of the torch.library
// ops deformable_detr::ms_deform_attn_forward / ms_deform_attn_backward (schemas in ops/custom_ops.py).
//
// Layouts as in ms_deform_attn_cpu.cpp. float16 and bfloat16 accumulate in float32; the value gradient is
// accumulated in float32 (float64 for float64) and cast once at the end. Launch errors raise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bilinear.h"
#include "checks.h"

namespace deformable_detr {
namespace {

constexpr int kThreads = 256;

inline int64_t blocks_for(int64_t count) { return (count + kThreads - 1) / kThreads; }

// One thread per output element (batch, query, head, channel): loops over levels and points.
template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                               const int64_t* __restrict__ level_start_index,
                               const scalar_t* __restrict__ sampling_locations,
                               const scalar_t* __restrict__ attention_weights, scalar_t* __restrict__ output,
                               Sizes s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= s.batch * s.queries * s.heads * s.channels) return;
  const int64_t channel = index % s.channels;
  const int64_t batch_query_head = index / s.channels;
  const int64_t head = batch_query_head % s.heads;
  const int64_t batch = batch_query_head / (s.heads * s.queries);
  const int64_t row_stride = s.heads * s.channels;
  acc_t accumulator = 0;
  for (int64_t level = 0; level < s.levels; ++level) {
    if (!level_in_bounds(spatial_shapes, level_start_index, level, s.positions)) continue;
    const int64_t height = spatial_shapes[2 * level], width = spatial_shapes[2 * level + 1];
    const scalar_t* level_value =
        value + ((batch * s.positions + level_start_index[level]) * s.heads + head) * s.channels + channel;
    for (int64_t point = 0; point < s.points; ++point) {
      const int64_t sample = (batch_query_head * s.levels + level) * s.points + point;
      BilinearCorners<acc_t> corners;
      if (!bilinear_corners<acc_t>(static_cast<acc_t>(sampling_locations[2 * sample]),
                                   static_cast<acc_t>(sampling_locations[2 * sample + 1]), height, width, corners)) {
        continue;
      }
      acc_t sampled = 0;
      for (int c = 0; c < 4; ++c) {
        if (corners.position[c] >= 0) {
          sampled += corners.weight[c] * static_cast<acc_t>(level_value[corners.position[c] * row_stride]);
        }
      }
      accumulator += static_cast<acc_t>(attention_weights[sample]) * sampled;
    }
  }
  output[index] = static_cast<scalar_t>(accumulator);
}

// One thread per (batch, query, head, channel): scatters its share of grad_output into the four corners.
template <typename scalar_t>
__global__ void grad_value_kernel(const scalar_t* __restrict__ grad_output,
                                  const int64_t* __restrict__ spatial_shapes,
                                  const int64_t* __restrict__ level_start_index,
                                  const scalar_t* __restrict__ sampling_locations,
                                  const scalar_t* __restrict__ attention_weights,
                                  at::opmath_type<scalar_t>* __restrict__ grad_value, Sizes s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= s.batch * s.queries * s.heads * s.channels) return;
  const int64_t channel = index % s.channels;
  const int64_t batch_query_head = index / s.channels;
  const int64_t head = batch_query_head % s.heads;
  const int64_t batch = batch_query_head / (s.heads * s.queries);
  const int64_t row_stride = s.heads * s.channels;
  const acc_t grad = static_cast<acc_t>(grad_output[index]);
  for (int64_t level = 0; level < s.levels; ++level) {
    if (!level_in_bounds(spatial_shapes, level_start_index, level, s.positions)) continue;
    const int64_t height = spatial_shapes[2 * level], width = spatial_shapes[2 * level + 1];
    acc_t* level_grad =
        grad_value + ((batch * s.positions + level_start_index[level]) * s.heads + head) * s.channels + channel;
    for (int64_t point = 0; point < s.points; ++point) {
      const int64_t sample = (batch_query_head * s.levels + level) * s.points + point;
      BilinearCorners<acc_t> corners;
      if (!bilinear_corners<acc_t>(static_cast<acc_t>(sampling_locations[2 * sample]),
                                   static_cast<acc_t>(sampling_locations[2 * sample + 1]), height, width, corners)) {
        continue;
      }
      const acc_t scaled = static_cast<acc_t>(attention_weights[sample]) * grad;
      for (int c = 0; c < 4; ++c) {
        if (corners.position[c] >= 0) atomicAdd(level_grad + corners.position[c] * row_stride, scaled * corners.weight[c]);
      }
    }
  }
}

// One thread per sample (batch, query, head, level, point): reduces over channels for the gradients of its
// attention weight and its sampling location, which it alone writes.
template <typename scalar_t>
__global__ void grad_sampling_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                                     const int64_t* __restrict__ spatial_shapes,
                                     const int64_t* __restrict__ level_start_index,
                                     const scalar_t* __restrict__ sampling_locations,
                                     const scalar_t* __restrict__ attention_weights,
                                     scalar_t* __restrict__ grad_sampling_locations,
                                     scalar_t* __restrict__ grad_attention_weights, Sizes s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t sample = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (sample >= s.batch * s.queries * s.heads * s.levels * s.points) return;
  const int64_t level = (sample / s.points) % s.levels;
  const int64_t batch_query_head = sample / (s.points * s.levels);
  const int64_t head = batch_query_head % s.heads;
  const int64_t batch = batch_query_head / (s.heads * s.queries);
  acc_t grad_attention = 0, grad_h = 0, grad_w = 0;
  BilinearCorners<acc_t> corners;
  const int64_t height = spatial_shapes[2 * level], width = spatial_shapes[2 * level + 1];
  if (level_in_bounds(spatial_shapes, level_start_index, level, s.positions) &&
      bilinear_corners<acc_t>(static_cast<acc_t>(sampling_locations[2 * sample]),
                              static_cast<acc_t>(sampling_locations[2 * sample + 1]), height, width, corners)) {
    const int64_t row_stride = s.heads * s.channels;
    const scalar_t* level_value = value + ((batch * s.positions + level_start_index[level]) * s.heads + head) * s.channels;
    const scalar_t* grad_out = grad_output + batch_query_head * s.channels;
    const acc_t dh = corners.frac_h, dw = corners.frac_w;
    for (int64_t d = 0; d < s.channels; ++d) {
      acc_t v[4];
      for (int c = 0; c < 4; ++c) {
        v[c] = corners.position[c] >= 0 ? static_cast<acc_t>(level_value[corners.position[c] * row_stride + d])
                                        : acc_t(0);
      }
      const acc_t g = static_cast<acc_t>(grad_out[d]);
      grad_attention +=
          g * (corners.weight[0] * v[0] + corners.weight[1] * v[1] + corners.weight[2] * v[2] + corners.weight[3] * v[3]);
      grad_w += g * ((acc_t(1) - dh) * (v[1] - v[0]) + dh * (v[3] - v[2]));
      grad_h += g * ((acc_t(1) - dw) * (v[2] - v[0]) + dw * (v[3] - v[1]));
    }
  }
  const acc_t attention = static_cast<acc_t>(attention_weights[sample]);
  grad_attention_weights[sample] = static_cast<scalar_t>(grad_attention);
  grad_sampling_locations[2 * sample] = static_cast<scalar_t>(attention * grad_w * static_cast<acc_t>(width));
  grad_sampling_locations[2 * sample + 1] = static_cast<scalar_t>(attention * grad_h * static_cast<acc_t>(height));
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard device_guard(value.device());
  at::Tensor output = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());
  const int64_t count = output.numel();
  if (count == 0) return output;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(count), kThreads, 0, stream>>>(
        value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(),
        s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard device_guard(value.device());
  const at::Tensor grad = grad_output.contiguous();
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({s.batch, s.queries, s.heads * s.channels}),
                    "grad_output must be (N, Lq, M * D), got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == value.scalar_type(), "grad_output must have value's dtype");
  TORCH_CHECK_VALUE(grad.device() == value.device(), "grad_output must be on value's device");
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(at::toOpMathType(value.scalar_type())));
  at::Tensor grad_sampling_locations = at::empty_like(sampling_locations);
  at::Tensor grad_attention_weights = at::empty_like(attention_weights);
  const int64_t outputs = grad.numel();
  const int64_t samples = attention_weights.numel();
  if (outputs > 0 && samples > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      grad_value_kernel<scalar_t><<<blocks_for(outputs), kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
          sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(),
          grad_value.data_ptr<at::opmath_type<scalar_t>>(), s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_sampling_kernel<scalar_t><<<blocks_for(samples), kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
          level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
          attention_weights.data_ptr<scalar_t>(), grad_sampling_locations.data_ptr<scalar_t>(),
          grad_attention_weights.data_ptr<scalar_t>(), s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    grad_sampling_locations.zero_();
    grad_attention_weights.zero_();
  }
  return {grad_value.to(value.scalar_type()), grad_sampling_locations, grad_attention_weights};
}

}  // namespace
}  // namespace deformable_detr

TORCH_LIBRARY_IMPL(deformable_detr, CUDA, m) {
  m.impl("ms_deform_attn_forward", &deformable_detr::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &deformable_detr::ms_deform_attn_backward_cuda);
}
