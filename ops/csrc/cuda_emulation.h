// Host emulation of the CUDA built-ins that ms_deform_attn_cuda_kernels.h uses, so that g++ compiles the exact
// kernel code of the GPU and runs it on the CPU (tests only: ms_deform_attn_emulated.cpp).
//
// Every thread of a block is a fiber (ucontext). A warp's 32 fibers run in lockstep at every warp-synchronous
// operation (__shfl_sync, __shfl_xor_sync): a lane that reaches one waits until every live lane of its warp has
// reached one; then the emulator checks what the hardware requires (the same operation, mask and width in every
// lane, a mask naming exactly the live lanes, sources inside the mask) and hands out the values. Warps and blocks
// run one after another, so atomics are plain adds. Every global access through the kernels' access helpers is
// checked against the tensors the launch bound (inside, writable when written, aligned to its width).
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct EmulatedDim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

namespace msda_emulation {

enum class WarpOp { kNone, kShuffle, kShuffleXor };

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  EmulatedDim3 thread_index;
  bool done = false;
  WarpOp op = WarpOp::kNone;
  unsigned mask = 0;
  int argument = 0;  // source lane or xor mask
  int width = 32;
  uint64_t bits = 0;    // the value this lane offers
  uint64_t result = 0;  // the value it receives
};

struct Range {
  const char* begin;
  const char* end;
  bool writable;
};

struct Emulator {
  EmulatedDim3 block_index, block_dim, grid_dim;
  std::vector<Fiber> fibers = std::vector<Fiber>(32);
  Fiber* current = nullptr;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  std::vector<Range> ranges;
  std::string error;  // the first violation; the launch raises it
  int64_t warp_operations = 0;
  int64_t atomic_adds = 0;
};

inline Emulator& emulator() {
  static Emulator instance;
  return instance;
}

inline void fail(const std::string& message) {
  Emulator& e = emulator();
  if (e.error.empty()) e.error = message;
}

inline void check_access(const void* pointer, size_t bytes, bool write) {
  const char* begin = static_cast<const char*>(pointer);
  if (reinterpret_cast<uintptr_t>(pointer) % bytes != 0 && (bytes & (bytes - 1)) == 0) {
    std::ostringstream message;
    message << (write ? "write" : "read") << " of " << bytes << " bytes at " << pointer << " is misaligned";
    fail(message.str());
  }
  for (const Range& range : emulator().ranges) {
    if (begin >= range.begin && begin + bytes <= range.end) {
      if (write && !range.writable) fail("write into an input tensor");
      return;
    }
  }
  std::ostringstream message;
  message << (write ? "write" : "read") << " of " << bytes << " bytes at " << pointer
          << " outside every tensor of the launch (thread " << emulator().current->thread_index.x << " of block "
          << emulator().block_index.x << ")";
  fail(message.str());
}

// Called by a fiber: offers `bits` to its warp, waits for the warp, returns what it receives.
inline uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t bits, int argument, int width) {
  Emulator& e = emulator();
  Fiber& fiber = *e.current;
  fiber.op = op;
  fiber.mask = mask;
  fiber.bits = bits;
  fiber.argument = argument;
  fiber.width = width;
  swapcontext(&fiber.context, &e.scheduler);
  return fiber.result;
}

// Called by the scheduler once every live lane of the warp waits at a warp-synchronous operation.
inline void resolve_warp(int lanes) {
  Emulator& e = emulator();
  unsigned waiting = 0;
  int first = -1;
  for (int lane = 0; lane < lanes; ++lane) {
    if (!e.fibers[lane].done) {
      waiting |= 1u << lane;
      if (first < 0) first = lane;
    }
  }
  const Fiber& leader = e.fibers[first];
  if (leader.width <= 0 || leader.width > 32 || (leader.width & (leader.width - 1)) != 0) {
    fail("shuffle width " + std::to_string(leader.width) + " is not a power of two up to 32");
  }
  for (int lane = 0; lane < lanes; ++lane) {
    const Fiber& fiber = e.fibers[lane];
    if (fiber.done) continue;
    if (fiber.op != leader.op || fiber.mask != leader.mask || fiber.width != leader.width) {
      fail("the lanes of a warp reached different warp-synchronous operations (divergent shuffle)");
    }
  }
  if (leader.mask != waiting) {
    std::ostringstream message;
    message << "shuffle mask 0x" << std::hex << leader.mask << " differs from the live lanes 0x" << waiting;
    fail(message.str());
  }
  for (int lane = 0; lane < lanes; ++lane) {
    Fiber& fiber = e.fibers[lane];
    if (fiber.done) continue;
    const int segment = lane & ~(fiber.width - 1);
    int source = fiber.op == WarpOp::kShuffle ? segment + (fiber.argument & (fiber.width - 1))
                                              : lane ^ fiber.argument;
    if (source < segment || source >= segment + fiber.width) source = lane;  // xor leaving the segment
    if (!(waiting >> source & 1u)) fail("a shuffle reads a lane outside its mask");
    fiber.result = e.fibers[source].bits;
  }
  for (int lane = 0; lane < lanes; ++lane) e.fibers[lane].op = WarpOp::kNone;
  ++e.warp_operations;
}

inline void fiber_entry() {
  Emulator& e = emulator();
  (*e.body)();
  e.current->done = true;  // uc_link returns to the scheduler
}

// Runs the threads [first_thread, first_thread + lanes) of the current block as one warp.
inline void run_warp(unsigned first_thread, int lanes) {
  Emulator& e = emulator();
  constexpr size_t kStackBytes = 256 * 1024;
  for (int lane = 0; lane < lanes; ++lane) {
    Fiber& fiber = e.fibers[lane];
    fiber.stack.resize(kStackBytes);
    fiber.done = false;
    fiber.op = WarpOp::kNone;
    fiber.thread_index.x = first_thread + lane;
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack.data();
    fiber.context.uc_stack.ss_size = fiber.stack.size();
    fiber.context.uc_link = &e.scheduler;
    makecontext(&fiber.context, fiber_entry, 0);
  }
  while (e.error.empty()) {
    bool any_live = false;
    for (int lane = 0; lane < lanes; ++lane) {
      Fiber& fiber = e.fibers[lane];
      if (fiber.done) continue;
      e.current = &fiber;
      swapcontext(&e.scheduler, &fiber.context);  // runs the lane to its next warp operation or its end
      any_live = any_live || !fiber.done;
    }
    if (!any_live) return;
    resolve_warp(lanes);
  }
}

// Launches `body` (a call of a __global__ function) on every thread of a one-dimensional grid.
inline void launch(int64_t blocks, int threads, const std::function<void()>& body) {
  Emulator& e = emulator();
  e.body = &body;
  e.error.clear();
  e.grid_dim.x = static_cast<unsigned>(blocks);
  e.block_dim.x = static_cast<unsigned>(threads);
  for (int64_t block = 0; block < blocks && e.error.empty(); ++block) {
    e.block_index.x = static_cast<unsigned>(block);
    for (int first = 0; first < threads && e.error.empty(); first += 32) {
      run_warp(static_cast<unsigned>(first), std::min(32, threads - first));
    }
  }
  e.body = nullptr;
  if (!e.error.empty()) throw std::runtime_error("emulated CUDA kernel: " + e.error);
}

inline const EmulatedDim3& thread_index() { return emulator().current->thread_index; }

template <typename T>
inline uint64_t to_bits(T value) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
inline T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

}  // namespace msda_emulation

#define threadIdx (::msda_emulation::thread_index())
#define blockIdx (::msda_emulation::emulator().block_index)
#define blockDim (::msda_emulation::emulator().block_dim)
#define gridDim (::msda_emulation::emulator().grid_dim)

template <typename T>
inline T __shfl_sync(unsigned mask, T value, int source_lane, int width = 32) {
  using namespace msda_emulation;
  return from_bits<T>(warp_exchange(WarpOp::kShuffle, mask, to_bits(value), source_lane, width));
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  using namespace msda_emulation;
  return from_bits<T>(warp_exchange(WarpOp::kShuffleXor, mask, to_bits(value), lane_mask, width));
}

template <typename T>
inline T atomicAdd(T* address, T value) {
  msda_emulation::check_access(address, sizeof(T), true);
  ++msda_emulation::emulator().atomic_adds;
  const T old = *address;
  *address = old + value;
  return old;
}

inline float2 atomicAdd(float2* address, float2 value) {
  msda_emulation::check_access(address, sizeof(float2), true);
  ++msda_emulation::emulator().atomic_adds;
  const float2 old = *address;
  *address = {old.x + value.x, old.y + value.y};
  return old;
}

inline float4 atomicAdd(float4* address, float4 value) {
  msda_emulation::check_access(address, sizeof(float4), true);
  ++msda_emulation::emulator().atomic_adds;
  const float4 old = *address;
  *address = {old.x + value.x, old.y + value.y, old.z + value.z, old.w + value.w};
  return old;
}

// The emulator runs the vector-atomic path of sm_90 (the scalar path of sm_80 is the plain loop beside it).
#define MSDA_VECTOR_ATOMICS 1
#define MSDA_CHECK_ACCESS(pointer, bytes, write) ::msda_emulation::check_access(pointer, bytes, write)
