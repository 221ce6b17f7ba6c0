// CUDA kernels of multi-scale deformable attention, registered as the CUDA implementations of the torch.library
// ops deformable_detr::ms_deform_attn_forward / ms_deform_attn_backward (schemas in ops/custom_ops.py).
//
// The kernels and their host code live in ms_deform_attn_cuda_kernels.h, which the tests also compile for the CPU
// (ms_deform_attn_emulated.cpp); this file only launches them on the current stream. Launch errors raise.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ms_deform_attn_cuda_kernels.h"

namespace deformable_detr {
namespace {

struct CudaLauncher {
  static void bind(const std::vector<cuda_kernels::Binding>&) {}

  template <typename... Parameters, typename... Arguments>
  static void launch(void (*kernel)(Parameters...), int64_t blocks, int threads, const Arguments&... arguments) {
    kernel<<<static_cast<unsigned>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(arguments...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard device_guard(value.device());
  return cuda_kernels::forward<CudaLauncher>(value, spatial_shapes, level_start_index, sampling_locations,
                                             attention_weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_output, const at::Tensor& value,
                                                             const at::Tensor& spatial_shapes,
                                                             const at::Tensor& level_start_index,
                                                             const at::Tensor& sampling_locations,
                                                             const at::Tensor& attention_weights,
                                                             std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard device_guard(value.device());
  return cuda_kernels::backward<CudaLauncher>(grad_output, value, spatial_shapes, level_start_index,
                                              sampling_locations, attention_weights, output_mask);
}

}  // namespace
}  // namespace deformable_detr

TORCH_LIBRARY_IMPL(deformable_detr, CUDA, m) {
  m.impl("ms_deform_attn_forward", &deformable_detr::forward_cuda);
  m.impl("ms_deform_attn_backward", &deformable_detr::backward_cuda);
}
