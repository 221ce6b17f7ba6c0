// The CUDA kernels of ms_deform_attn_cuda_kernels.h compiled by the host compiler and run by the emulation of
// cuda_emulation.h: every block, every thread, warps in lockstep at their shuffles, atomics as adds, every global
// access checked. For the tests only (ops.build.load_emulated_kernel), as the ops
// deformable_detr_emulated::ms_deform_attn_forward / ms_deform_attn_backward with the schemas of the real ones.
// Outputs the kernels must write are poisoned (NaN) before the launch, so an element never written shows.
#include "cuda_emulation.h"  // first: the CUDA built-ins the kernel header uses

#include <torch/library.h>

#include <limits>
#include <mutex>

#include "ms_deform_attn_cuda_kernels.h"

namespace deformable_detr {
namespace {

std::mutex emulator_mutex;  // one emulator: launches run one at a time

struct EmulatedLauncher {
  static void bind(std::initializer_list<at::Tensor> inputs, const std::vector<at::Tensor>& outputs) {
    auto& ranges = msda_emulation::emulator().ranges;
    ranges.clear();
    auto add = [&](const at::Tensor& t, bool writable) {
      const char* begin = static_cast<const char*>(t.data_ptr());
      ranges.push_back({begin, begin + t.numel() * t.element_size(), writable});
    };
    for (const at::Tensor& t : inputs) add(t, false);
    for (const at::Tensor& t : outputs) add(t, true);
  }

  static void poison(const at::Tensor& t) { t.fill_(std::numeric_limits<double>::quiet_NaN()); }

  template <typename... Parameters, typename... Arguments>
  static void launch(void (*kernel)(Parameters...), int64_t blocks, int threads, const Arguments&... arguments) {
    const std::function<void()> body = [&] { kernel(arguments...); };
    msda_emulation::launch(blocks, threads, body);
  }
};

at::Tensor forward_emulated(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  const std::lock_guard<std::mutex> lock(emulator_mutex);
  at::Tensor output = cuda_kernels::forward<EmulatedLauncher>(value, spatial_shapes, level_start_index,
                                                              sampling_locations, attention_weights);
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_emulated(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    std::array<bool, 3> output_mask) {
  const std::lock_guard<std::mutex> lock(emulator_mutex);
  return cuda_kernels::backward<EmulatedLauncher>(grad_output, value, spatial_shapes, level_start_index,
                                                  sampling_locations, attention_weights, output_mask);
}

// Kernels with one defect each, for the test that the emulation catches what a GPU would punish.
__global__ void defect_kernel(int defect, const float* input, float* output) {
  const int lane = threadIdx.x & 31;
  float value = cuda_kernels::load_scalar(input + threadIdx.x);
  if (defect == 1 && lane == 0) return;                                 // lane 0 exits, the others shuffle with it
  if (defect == 2 && lane % 2 == 1) value = __shfl_xor_sync(0xffffffffu, value, 1);  // divergent shuffle
  value = __shfl_sync(0xffffffffu, value, 31 - lane);                   // reverse the warp
  if (defect == 3) value += cuda_kernels::load_scalar(input + blockDim.x);  // one past the end
  if (defect == 4) value += cuda_kernels::load_vector<4>(input + 1).element[0];  // misaligned 16-byte load
  cuda_kernels::store_scalar(output + threadIdx.x, value);
}

// Runs defect_kernel on one block of 64 threads over input (64,) float32; raises what the emulation found.
at::Tensor run_defect_kernel(const at::Tensor& input, int64_t defect) {
  const std::lock_guard<std::mutex> lock(emulator_mutex);
  TORCH_CHECK(input.numel() == 64 && input.scalar_type() == at::kFloat && input.is_contiguous());
  at::Tensor output = at::empty_like(input);
  EmulatedLauncher::bind({input}, {output});
  EmulatedLauncher::launch(defect_kernel, 1, 64, static_cast<int>(defect), input.data_ptr<float>(),
                           output.data_ptr<float>());
  return output;
}

// The launch plan (V, lanes, blocks) of the CUDA host code for sizes (N, S, M, D, Lq, L, P), dtype element size
// and the alignment in bytes of the tensors' addresses; raises where the host code refuses.
std::vector<int64_t> launch_plan(std::vector<int64_t> sizes, int64_t element_size, int64_t alignment) {
  TORCH_CHECK(sizes.size() == 7, "sizes must be (N, S, M, D, Lq, L, P)");
  const Sizes s{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], sizes[6]};
  const void* address = reinterpret_cast<const void*>(static_cast<uintptr_t>(alignment));
  const cuda_kernels::LaunchPlan plan = cuda_kernels::plan_launch(s, static_cast<size_t>(element_size), {address});
  return {plan.vector_width, plan.lanes, plan.blocks};
}

// (warp-synchronous operations, atomic adds) of the launches so far: the tests read them to see work skipped.
std::vector<int64_t> emulator_counters() {
  const auto& e = msda_emulation::emulator();
  return {e.warp_operations, e.atomic_adds};
}

}  // namespace
}  // namespace deformable_detr

TORCH_LIBRARY(deformable_detr_emulated, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, bool[3] output_mask=[True, True, True]) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("counters() -> int[]", &deformable_detr::emulator_counters);
  m.def("launch_plan(int[] sizes, int element_size, int alignment) -> int[]", &deformable_detr::launch_plan);
  m.def("run_defect_kernel(Tensor input, int defect) -> Tensor", &deformable_detr::run_defect_kernel);
}

TORCH_LIBRARY_IMPL(deformable_detr_emulated, CPU, m) {
  m.impl("ms_deform_attn_forward", &deformable_detr::forward_emulated);
  m.impl("ms_deform_attn_backward", &deformable_detr::backward_emulated);
}
