// The CUDA kernels of ms_deform_attn_cuda_kernels.h compiled by the host compiler and run by the emulation of
// cuda_emulation.h: every block, every thread, warps in lockstep at their shuffles, lanes, warps and blocks in a
// seeded random order, every global access checked against the tensor its pointer came from and for data races,
// outputs poisoned (NaN) before the launch and checked to be written whole. For the tests and tools only
// (ops.build.load_emulated_kernel), as the ops <library>::ms_deform_attn_forward / ms_deform_attn_backward with the
// schemas of the real ones, where <library> is deformable_detr_emulated, or deformable_detr_emulated_mutants for
// the build with MSDA_MUTATIONS (set_mutation switches one deliberate defect on).
#include "cuda_emulation.h"  // first: the CUDA built-ins the kernel header uses

#include <torch/library.h>

#include <limits>
#include <mutex>

#include "ms_deform_attn_cuda_kernels.h"

#ifndef MSDA_EMULATED_LIBRARY
#define MSDA_EMULATED_LIBRARY deformable_detr_emulated
#endif

namespace deformable_detr {
namespace {

std::mutex emulator_mutex;  // one emulator: launches run one at a time

struct EmulatedLauncher {
  // Binds the launch's tensors and poisons its outputs, so that an element never written shows as NaN too.
  static void bind(const std::vector<cuda_kernels::Binding>& bindings) {
    std::vector<msda_emulation::BoundTensor> tensors;
    for (const cuda_kernels::Binding& binding : bindings) {
      const at::Tensor& t = binding.tensor;
      TORCH_CHECK(t.is_contiguous(), "emulated launch: ", binding.name, " is not contiguous");
      if (binding.role == cuda_kernels::Role::kOutput) t.fill_(std::numeric_limits<double>::quiet_NaN());
      char* begin = static_cast<char*>(t.data_ptr());
      const auto role = binding.role == cuda_kernels::Role::kInput    ? msda_emulation::Role::kInput
                        : binding.role == cuda_kernels::Role::kOutput ? msda_emulation::Role::kOutput
                                                                      : msda_emulation::Role::kAccumulator;
      tensors.push_back({binding.name, begin, begin + t.numel() * t.element_size(), t.element_size(), role, {}});
    }
    msda_emulation::bind(std::move(tensors));
  }

  template <typename... Parameters, typename... Arguments>
  static void launch(void (*kernel)(Parameters...), int64_t blocks, int threads, const Arguments&... arguments) {
    const std::tuple<Parameters...> parameters(arguments...);  // host pointers become tracked pointers here
    const std::function<void()> body = [&] { std::apply(kernel, parameters); };
    msda_emulation::launch(reinterpret_cast<const void*>(kernel), blocks, threads, body);
  }
};

at::Tensor forward_emulated(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  const std::lock_guard<std::mutex> lock(emulator_mutex);
  return cuda_kernels::forward<EmulatedLauncher>(value, spatial_shapes, level_start_index, sampling_locations,
                                                 attention_weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_emulated(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    std::array<bool, 3> output_mask) {
  const std::lock_guard<std::mutex> lock(emulator_mutex);
  return cuda_kernels::backward<EmulatedLauncher>(grad_output, value, spatial_shapes, level_start_index,
                                                  sampling_locations, attention_weights, output_mask);
}

}  // namespace

// A kernel with one defect at a time, for the tests that the emulation catches what a GPU would punish (outside the
// anonymous namespace: an exported symbol, which the emulation names in its messages).
__global__ void defect_kernel(int defect, GlobalPointer<const float> input, GlobalPointer<float> output,
                              GlobalPointer<float> total) {
  const int thread = threadIdx.x;
  const int lane = thread & 31;
  float value = cuda_kernels::load_scalar(input + thread);
  const float one = 1.0f;
  cuda_kernels::atomic_add<1>(total, &one);  // every thread adds to one element: atomics do not race
  if (defect == 1 && lane == 0) return;      // lane 0 exits, the others shuffle with it
  if (defect == 2 && lane % 2 == 1) value = __shfl_xor_sync(0xffffffffu, value, 1);  // divergent shuffle
  value = __shfl_sync(0xffffffffu, value, 31 - lane);                                 // reverse the warp
  if (defect == 3) value += cuda_kernels::load_scalar(input + blockDim.x);  // one past input's end: output[0]
  if (defect == 4) value += cuda_kernels::load_vector<4>(input + 1).element[0];       // misaligned 16-byte load
  if (defect == 5) cuda_kernels::store_scalar(output + (thread ^ 1), value);          // two threads write one element
  if (defect == 6) value += cuda_kernels::load_scalar<float>(output + (thread ^ 1));  // reads what another writes
  if (defect == 7 && thread == 0) cuda_kernels::store_scalar(total, value);  // a plain write among the atomics
  if (defect == 8 && thread == 37) return;                                   // output[37] never written
  if (defect == 9) value += cuda_kernels::load_scalar(GlobalPointer<const float>(&value));  // a raw address
  cuda_kernels::store_scalar(output + thread, value);
}

namespace {

// Runs defect_kernel on one block of 64 threads over input (64,) float32, which lies just before the output in one
// allocation; returns the output, raises what the emulation found.
at::Tensor run_defect_kernel(const at::Tensor& input, const std::string& defect) {
  static const std::vector<std::string> kDefects{"none",       "exited_lane",     "divergent_shuffle",
                                                 "past_the_end", "misaligned",    "write_race",
                                                 "read_write_race", "plain_write_among_atomics", "unwritten",
                                                 "raw_pointer"};
  const auto found = std::find(kDefects.begin(), kDefects.end(), defect);
  TORCH_CHECK(found != kDefects.end(), "unknown defect ", defect);
  const std::lock_guard<std::mutex> lock(emulator_mutex);
  TORCH_CHECK(input.numel() == 64 && input.scalar_type() == at::kFloat);
  const at::Tensor storage = at::empty({128}, input.options());
  const at::Tensor inside = storage.slice(0, 0, 64), output = storage.slice(0, 64, 128);
  inside.copy_(input.reshape(64));
  const at::Tensor total = at::zeros({1}, input.options());
  EmulatedLauncher::bind({{"input", inside, cuda_kernels::Role::kInput},
                          {"output", output, cuda_kernels::Role::kOutput},
                          {"total", total, cuda_kernels::Role::kAccumulator}});
  EmulatedLauncher::launch(defect_kernel, 1, 64, static_cast<int>(found - kDefects.begin()), inside.data_ptr<float>(),
                           output.data_ptr<float>(), total.data_ptr<float>());
  return output.clone();
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

// Cumulative counters of the launches so far: "launches", "warp_operations" (shuffles), and per kind of global
// access (load, store, atomic) and tensor "<kind>.<tensor>.<measure>" for the measures instructions (warp
// instructions), lanes (lane operations), sectors (distinct 32-byte sectors per instruction, summed) and bytes.
c10::Dict<std::string, int64_t> counters() {
  const std::lock_guard<std::mutex> lock(emulator_mutex);
  const auto& e = msda_emulation::emulator();
  c10::Dict<std::string, int64_t> result;
  result.insert("launches", e.launches);
  result.insert("warp_operations", e.warp_operations);
  static const char* kKinds[] = {"load", "store", "atomic"};
  for (const auto& [key, tally] : e.tallies) {
    const std::string prefix = std::string(kKinds[key.first]) + "." + key.second + ".";
    result.insert(prefix + "instructions", tally.instructions);
    result.insert(prefix + "lanes", tally.lanes);
    result.insert(prefix + "sectors", tally.sectors);
    result.insert(prefix + "bytes", tally.bytes);
  }
  return result;
}

// seed >= 0: every later launch runs in the order this seed gives (as MSDA_EMULATION_SEED does); -1: a fresh seed
// per launch. Returns the setting it replaces (to restore it).
int64_t set_seed(int64_t seed) {
  const std::lock_guard<std::mutex> lock(emulator_mutex);
  auto& e = msda_emulation::emulator();
  msda_emulation::launch_seed();  // reads MSDA_EMULATION_SEED, if not yet
  const int64_t previous = e.fixed_seed ? static_cast<int64_t>(e.seed) : -1;
  e.fixed_seed = seed >= 0;
  e.seed = seed >= 0 ? static_cast<uint64_t>(seed) : std::random_device{}();
  return previous;
}

// "name:role" of each tensor bound to the last launch, role input, output or accumulator.
std::vector<std::string> last_bindings() {
  const std::lock_guard<std::mutex> lock(emulator_mutex);
  static const char* kRoles[] = {"input", "output", "accumulator"};
  std::vector<std::string> result;
  for (const auto& tensor : msda_emulation::emulator().tensors) {
    result.push_back(tensor.name + ":" + kRoles[static_cast<int>(tensor.role)]);
  }
  return result;
}

int64_t last_seed() { return static_cast<int64_t>(msda_emulation::emulator().launch_seed); }

// 90: the value gradient uses sm_90's float2/float4 atomics where they apply; 80: sm_80's scalar atomics only.
void set_architecture(int64_t sm) {
  TORCH_CHECK(sm == 80 || sm == 90, "set_architecture: 80 or 90, got ", sm);
  const std::lock_guard<std::mutex> lock(emulator_mutex);
  msda_emulation::emulator().vector_atomics = sm == 90;
}

#ifdef MSDA_MUTATIONS
// Switches on one deliberate defect of the kernel source ("" or "none": none).
void set_mutation(const std::string& name) {
  using msda_emulation::Mutation;
  static const std::vector<std::pair<std::string, Mutation>> kMutations{
      {"none", Mutation::kNone},
      {"forward_weight_lane", Mutation::kForwardWeightLane},
      {"drop_corner3_atomic", Mutation::kDropCorner3Atomic},
      {"plain_add", Mutation::kPlainAdd},
      {"right_border", Mutation::kRightBorder},
      {"owns_before_shuffles", Mutation::kOwnsBeforeShuffles}};
  const std::string wanted = name.empty() ? "none" : name;
  for (const auto& [known, mutation] : kMutations) {
    if (known == wanted) {
      const std::lock_guard<std::mutex> lock(emulator_mutex);
      msda_emulation::emulator().mutation = mutation;
      return;
    }
  }
  TORCH_CHECK(false, "unknown mutation ", name);
}
#endif

}  // namespace
}  // namespace deformable_detr

// TORCH_LIBRARY pastes its namespace argument: this indirection expands MSDA_EMULATED_LIBRARY first.
#define MSDA_DEFINE_LIBRARY(library, m) TORCH_LIBRARY(library, m)
#define MSDA_IMPLEMENT_LIBRARY(library, key, m) TORCH_LIBRARY_IMPL(library, key, m)

MSDA_DEFINE_LIBRARY(MSDA_EMULATED_LIBRARY, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, bool[3] output_mask=[True, True, True]) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("counters() -> Dict(str, int)", &deformable_detr::counters);
  m.def("set_seed(int seed) -> int", &deformable_detr::set_seed);
  m.def("last_bindings() -> str[]", &deformable_detr::last_bindings);
  m.def("last_seed() -> int", &deformable_detr::last_seed);
  m.def("set_architecture(int sm) -> ()", &deformable_detr::set_architecture);
  m.def("launch_plan(int[] sizes, int element_size, int alignment) -> int[]", &deformable_detr::launch_plan);
  m.def("run_defect_kernel(Tensor input, str defect) -> Tensor", &deformable_detr::run_defect_kernel);
#ifdef MSDA_MUTATIONS
  m.def("set_mutation(str name) -> ()", &deformable_detr::set_mutation);
#endif
}

MSDA_IMPLEMENT_LIBRARY(MSDA_EMULATED_LIBRARY, CPU, m) {
  m.impl("ms_deform_attn_forward", &deformable_detr::forward_emulated);
  m.impl("ms_deform_attn_backward", &deformable_detr::backward_emulated);
}
