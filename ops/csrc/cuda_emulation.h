// Host emulation of the CUDA built-ins that ms_deform_attn_cuda_kernels.h uses, so that g++ compiles the exact
// kernel code of the GPU and runs it on the CPU (tests and tools only: ms_deform_attn_emulated.cpp). What it checks
// and what only a GPU can confirm: docs/gpu_verification.md.
//
// Every thread of a block is a fiber (ucontext). A warp's fibers run in lockstep at every warp-synchronous
// operation (__shfl_sync, __shfl_xor_sync): a lane that reaches one waits until every live lane of its warp has
// reached one; then the emulator checks what the hardware requires (the same operation, mask and width in every
// lane, a mask naming exactly the live lanes, sources inside the mask) and hands out the values. Between those
// points the lanes of a warp run one after another in a random order, the warps of a block interleave at random,
// and the blocks run in a random order: all drawn from one seed per launch, printed with every failure and fixed
// by MSDA_EMULATION_SEED (or set_seed) to replay it.
//
// Global memory is reached only through GlobalPointer<T> (a TrackedPointer here, a T* for nvcc): a kernel argument
// remembers which bound tensor it points into, and everything derived from it by arithmetic keeps that tensor, so
// each access is checked against the tensor its pointer came from: inside it, aligned to its width and to the
// element, writable when written. Each element of a writable tensor keeps a history of the threads that touched it
// in the launch; two threads touching one element, at least one writing, not both atomically, is a data race
// (these kernels have no barriers, so nothing orders two threads' accesses). After the launch every element of an
// output must have been written. The first violation stops the launch and raises, naming the kernel, the tensor,
// the element and the threads.
//
// Counters: each lane logs its global accesses; at each warp-synchronous point (and at the warp's end) the k-th
// access of each kind of every lane since the last such point forms one warp instruction, whose distinct 32-byte
// sectors are counted per (kind, tensor). This is exact for code whose lanes run the same loads, stores and atomics
// between shuffles; where a branch skips some (a corner outside the map), the instruction count is a lower bound and
// the sector total still that of the hardware as long as the groups of a warp touch different rows.
#pragma once

#define MSDA_EMULATION 1

#include <cxxabi.h>
#include <dlfcn.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
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

enum class Access { kRead, kWrite, kAtomic };
// input: read only; output: poisoned before the launch, every element must be written; accumulator: initialised
// by the host, read, written or added to by the kernel.
enum class Role { kInput, kOutput, kAccumulator };
enum class WarpOp { kNone, kShuffle, kShuffleXor };

// Deliberate defects the tests switch on one at a time in the mutant build (MSDA_MUTATIONS), to show that the
// emulation catches them; MSDA_MUTATION(name) is a constant false in every other build.
enum class Mutation { kNone, kForwardWeightLane, kDropCorner3Atomic, kPlainAdd, kRightBorder, kOwnsBeforeShuffles };

// The threads that touched one element of a writable tensor during the launch (global thread ids; -1: none). Two
// distinct ids per set suffice: one of them differs from any thread that comes later.
struct History {
  int32_t writer = -1;
  int32_t readers[2] = {-1, -1};
  int32_t atomics[2] = {-1, -1};
};

struct BoundTensor {
  std::string name;
  char* begin;
  char* end;
  int64_t element_size;
  Role role;
  std::vector<History> history;  // per element, writable tensors only
};

struct LoggedAccess {
  Access kind;
  int tensor;
  uintptr_t address;
  int bytes;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  EmulatedDim3 thread_index;
  bool done = false;
  WarpOp op = WarpOp::kNone;
  unsigned mask = 0;
  int argument = 0;  // source lane or xor mask
  int width = 32;
  uint64_t bits = 0;    // the value this lane offers
  uint64_t result = 0;  // the value it receives
  std::vector<LoggedAccess> log;  // global accesses since the warp's last warp-synchronous operation
};

// Warp instructions, lane operations, distinct 32-byte sectors and bytes of one kind of access to one tensor.
struct Tally {
  int64_t instructions = 0, lanes = 0, sectors = 0, bytes = 0;
};

// splitmix64: a small, fast generator; the whole schedule of a launch follows from its seed.
struct Random {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  int below(int n) { return static_cast<int>(next() % static_cast<uint64_t>(n)); }
  template <typename T>
  void shuffle(std::vector<T>& items) {
    for (size_t i = items.size(); i > 1; --i) std::swap(items[i - 1], items[next() % i]);
  }
};

struct Emulator {
  EmulatedDim3 block_index, block_dim, grid_dim;
  std::vector<std::unique_ptr<Fiber>> fibers;  // one per thread of the running block
  Fiber* current = nullptr;                    // the running fiber; nullptr on the host
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  std::string kernel;
  std::vector<BoundTensor> tensors;
  std::string error;  // the first violation; the launch raises it
  // settings
  bool seeded = false;  // the settings below were read from the environment (or set)
  bool fixed_seed = false;
  uint64_t seed = 0;  // the fixed seed, or the next launch's
  uint64_t launch_seed = 0;
  bool vector_atomics = true;  // sm_90's float2/float4 atomics; false: sm_80's scalar ones
  Mutation mutation = Mutation::kNone;
  // counters, cumulative over launches
  int64_t launches = 0, warp_operations = 0;
  std::map<std::pair<int, std::string>, Tally> tallies;  // (Access, tensor name)
};

namespace {
// Internal linkage: two emulated extensions in one process (the tests' clean and mutant builds) keep apart, where
// g++ would merge a function-local static of an inline function across shared libraries (STB_GNU_UNIQUE).
Emulator the_emulator;
}  // namespace

inline Emulator& emulator() { return the_emulator; }

inline bool mutation_is(Mutation mutation) { return emulator().mutation == mutation; }

inline void fail(const std::string& message) {
  Emulator& e = emulator();
  if (e.error.empty()) e.error = message;
  if (e.current != nullptr) {  // a lane: stop it here, before the access it was about to make; never resumed
    Fiber& fiber = *e.current;
    swapcontext(&fiber.context, &e.scheduler);
  }
}

inline std::string thread_name(int64_t global_thread) {
  const int64_t threads = emulator().block_dim.x;
  return "thread " + std::to_string(global_thread % threads) + " of block " + std::to_string(global_thread / threads);
}

inline int64_t current_thread() {
  const Emulator& e = emulator();
  return static_cast<int64_t>(e.block_index.x) * e.block_dim.x + e.current->thread_index.x;
}

// The bound tensor whose bytes hold `address` (a kernel argument: a host pointer), -1 for none.
inline int tensor_holding(const void* address) {
  if (address == nullptr) return -1;
  const char* byte = static_cast<const char*>(address);
  const auto& tensors = emulator().tensors;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (byte >= tensors[i].begin && (byte < tensors[i].end || byte == tensors[i].begin)) return static_cast<int>(i);
  }
  return -1;
}

// A pointer into global memory that remembers the tensor it came from. Built from a raw pointer only on the host
// (a kernel argument); inside a kernel only by arithmetic on another, so the tensor always travels with it.
template <typename T>
struct TrackedPointer {
  T* address = nullptr;
  int tensor = -1;

  TrackedPointer() = default;
  TrackedPointer(std::nullptr_t) {}
  TrackedPointer(T* raw) : address(raw), tensor(tensor_holding(raw)) {
    if (emulator().current != nullptr) fail("a kernel turned a raw address into a global pointer");
  }
  template <typename U, typename = std::enable_if_t<std::is_convertible<U*, T*>::value>>
  TrackedPointer(const TrackedPointer<U>& other) : address(other.address), tensor(other.tensor) {}

  template <typename I, typename = std::enable_if_t<std::is_integral<I>::value>>
  TrackedPointer operator+(I offset) const {
    TrackedPointer moved;
    moved.address = address + offset;
    moved.tensor = tensor;
    return moved;
  }
  template <typename I, typename = std::enable_if_t<std::is_integral<I>::value>>
  TrackedPointer operator-(I offset) const {
    return *this + (-static_cast<int64_t>(offset));
  }
  template <typename I>
  T operator[](I index) const;  // a checked read

  friend bool operator==(const TrackedPointer& p, std::nullptr_t) { return p.address == nullptr; }
  friend bool operator!=(const TrackedPointer& p, std::nullptr_t) { return p.address != nullptr; }
};

inline void check_race(BoundTensor& tensor, int64_t first, int64_t last, Access kind) {
  const int32_t thread = static_cast<int32_t>(current_thread());
  auto other = [thread](int32_t id) { return id >= 0 && id != thread; };
  auto other_of = [&](const int32_t (&ids)[2]) { return other(ids[0]) ? ids[0] : other(ids[1]) ? ids[1] : -1; };
  auto remember = [thread](int32_t (&ids)[2]) {
    if (ids[0] < 0) {
      ids[0] = thread;
    } else if (ids[0] != thread && ids[1] < 0) {
      ids[1] = thread;
    }
  };
  for (int64_t element = first; element <= last; ++element) {
    History& h = tensor.history[element];
    int32_t conflict = -1;
    const char* what = "";
    if (other(h.writer)) {
      conflict = h.writer, what = "wrote";
    } else if (kind != Access::kRead && other_of(h.readers) >= 0) {
      conflict = other_of(h.readers), what = "read";
    } else if (kind != Access::kAtomic && other_of(h.atomics) >= 0) {
      conflict = other_of(h.atomics), what = "added to";
    }
    if (conflict >= 0) {
      const char* verb = kind == Access::kRead ? "reads" : kind == Access::kWrite ? "writes" : "atomically adds to";
      fail("data race on " + tensor.name + "[" + std::to_string(element) + "]: " + thread_name(thread) + " " + verb +
           " it and " + thread_name(conflict) + " " + what + " it, not both atomically");
      return;
    }
    if (kind == Access::kRead) remember(h.readers);
    if (kind == Access::kWrite) h.writer = thread;
    if (kind == Access::kAtomic) remember(h.atomics);
  }
}

// Checks an access of `bytes` at `pointer` and returns the address to make it at (MSDA_ADDRESS): a failed check
// stops the lane before the access happens.
template <typename T>
T* checked_address(TrackedPointer<T> pointer, size_t bytes, Access kind) {
  Emulator& e = emulator();
  auto access = [&] {  // "read of 16 bytes by thread 3 of block 0", for a failure
    const char* verb = kind == Access::kRead ? "read" : kind == Access::kWrite ? "write" : "atomic add";
    return std::string(verb) + " of " + std::to_string(bytes) + " bytes by " + thread_name(current_thread());
  };
  if (pointer.tensor < 0) {
    fail(access() + (pointer.address == nullptr ? " through a null pointer"
                                                : " through a pointer that came from no tensor of the launch"));
    return nullptr;
  }
  BoundTensor& tensor = e.tensors[pointer.tensor];
  const char* begin = reinterpret_cast<const char*>(pointer.address);
  const int64_t offset = begin - tensor.begin;
  if (begin < tensor.begin || begin + bytes > tensor.end) {
    const int64_t elements = (tensor.end - tensor.begin) / tensor.element_size;
    fail(access() + " at element " + std::to_string(offset / tensor.element_size) + " of " + tensor.name + " (" +
         std::to_string(elements) + " elements): outside the tensor its pointer came from");
    return nullptr;
  }
  if (kind != Access::kRead && tensor.role == Role::kInput) {
    fail(access() + " into the input " + tensor.name);
    return nullptr;
  }
  const bool power_of_two = (bytes & (bytes - 1)) == 0;
  if ((power_of_two && reinterpret_cast<uintptr_t>(begin) % bytes != 0) || offset % tensor.element_size != 0 ||
      static_cast<int64_t>(bytes) % tensor.element_size != 0) {
    fail(access() + " at byte " + std::to_string(offset) + " of " + tensor.name + " is misaligned");
    return nullptr;
  }
  if (!tensor.history.empty()) {
    check_race(tensor, offset / tensor.element_size, (offset + bytes) / tensor.element_size - 1, kind);
    if (!e.error.empty()) return nullptr;
  }
  e.current->log.push_back({kind, pointer.tensor, reinterpret_cast<uintptr_t>(begin), static_cast<int>(bytes)});
  return pointer.address;
}

template <typename T>
template <typename I>
T TrackedPointer<T>::operator[](I index) const {
  return *checked_address(*this + index, sizeof(T), Access::kRead);
}

// Counts the warp instructions of the accesses the lanes [first, first + lanes) logged, and clears the logs.
inline void count_accesses(int first, int lanes) {
  Emulator& e = emulator();
  for (Access kind : {Access::kRead, Access::kWrite, Access::kAtomic}) {
    std::vector<std::vector<const LoggedAccess*>> per_lane(lanes);
    size_t longest = 0;
    for (int lane = 0; lane < lanes; ++lane) {
      for (const LoggedAccess& access : e.fibers[first + lane]->log) {
        if (access.kind == kind) per_lane[lane].push_back(&access);
      }
      longest = std::max(longest, per_lane[lane].size());
    }
    for (size_t k = 0; k < longest; ++k) {  // the k-th access of each lane: one warp instruction per tensor
      std::map<int, std::vector<uintptr_t>> sectors;
      std::map<int, Tally> instruction;
      for (int lane = 0; lane < lanes; ++lane) {
        if (k >= per_lane[lane].size()) continue;
        const LoggedAccess& access = *per_lane[lane][k];
        Tally& tally = instruction[access.tensor];
        tally.lanes += 1;
        tally.bytes += access.bytes;
        for (uintptr_t sector = access.address / 32; sector <= (access.address + access.bytes - 1) / 32; ++sector) {
          sectors[access.tensor].push_back(sector);
        }
      }
      for (auto& [tensor, tally] : instruction) {
        std::vector<uintptr_t>& touched = sectors[tensor];
        std::sort(touched.begin(), touched.end());
        Tally& total = e.tallies[{static_cast<int>(kind), e.tensors[tensor].name}];
        total.instructions += 1;
        total.lanes += tally.lanes;
        total.bytes += tally.bytes;
        total.sectors += std::unique(touched.begin(), touched.end()) - touched.begin();
      }
    }
  }
  for (int lane = 0; lane < lanes; ++lane) e.fibers[first + lane]->log.clear();
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

// Called by the scheduler once every live lane of the warp [first, first + lanes) waits at a warp-synchronous
// operation.
inline void resolve_warp(int first, int lanes) {
  Emulator& e = emulator();
  auto lane_fiber = [&](int lane) -> Fiber& { return *e.fibers[first + lane]; };
  unsigned waiting = 0;
  int leader_lane = -1;
  for (int lane = 0; lane < lanes; ++lane) {
    if (!lane_fiber(lane).done) {
      waiting |= 1u << lane;
      if (leader_lane < 0) leader_lane = lane;
    }
  }
  const Fiber& leader = lane_fiber(leader_lane);
  if (leader.width <= 0 || leader.width > 32 || (leader.width & (leader.width - 1)) != 0) {
    fail("shuffle width " + std::to_string(leader.width) + " is not a power of two up to 32");
  }
  for (int lane = 0; lane < lanes; ++lane) {
    const Fiber& fiber = lane_fiber(lane);
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
  if (!e.error.empty()) return;
  for (int lane = 0; lane < lanes; ++lane) {
    Fiber& fiber = lane_fiber(lane);
    if (fiber.done) continue;
    const int segment = lane & ~(fiber.width - 1);
    int source = fiber.op == WarpOp::kShuffle ? segment + (fiber.argument & (fiber.width - 1))
                                              : lane ^ fiber.argument;
    if (source < segment || source >= segment + fiber.width) source = lane;  // xor leaving the segment
    if (!(waiting >> source & 1u)) fail("a shuffle reads a lane outside its mask");
    fiber.result = lane_fiber(source).bits;
  }
  for (int lane = 0; lane < lanes; ++lane) lane_fiber(lane).op = WarpOp::kNone;
  ++e.warp_operations;
  count_accesses(first, lanes);
}

inline void fiber_entry() {
  Emulator& e = emulator();
  (*e.body)();
  e.current->done = true;  // uc_link returns to the scheduler
}

inline void start_fiber(Fiber& fiber, unsigned thread) {
  constexpr size_t kStackBytes = 128 * 1024;
  if (!fiber.stack) fiber.stack.reset(new char[kStackBytes]);
  fiber.done = false;
  fiber.op = WarpOp::kNone;
  fiber.log.clear();
  fiber.thread_index.x = thread;
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = fiber.stack.get();
  fiber.context.uc_stack.ss_size = kStackBytes;
  fiber.context.uc_link = &emulator().scheduler;
  makecontext(&fiber.context, fiber_entry, 0);
}

// Runs each live lane of the warp [first, first + lanes), in a random order, to its next warp-synchronous operation
// or its end, then resolves the operation; true once every lane has ended.
inline bool step_warp(int first, int lanes, Random& random) {
  Emulator& e = emulator();
  std::vector<int> order;
  for (int lane = 0; lane < lanes; ++lane) {
    if (!e.fibers[first + lane]->done) order.push_back(lane);
  }
  random.shuffle(order);
  for (int lane : order) {
    Fiber& fiber = *e.fibers[first + lane];
    e.current = &fiber;
    swapcontext(&e.scheduler, &fiber.context);
    e.current = nullptr;
    if (!e.error.empty()) return true;
  }
  const bool ended = std::all_of(order.begin(), order.end(), [&](int lane) { return e.fibers[first + lane]->done; });
  if (ended) {
    count_accesses(first, lanes);
    return true;
  }
  resolve_warp(first, lanes);
  return false;
}

// Runs every thread of the block e.block_index: all its warps live, a random one advancing at each step.
inline void run_block(int threads, Random& random) {
  Emulator& e = emulator();
  while (static_cast<int>(e.fibers.size()) < threads) e.fibers.push_back(std::make_unique<Fiber>());
  for (int thread = 0; thread < threads; ++thread) start_fiber(*e.fibers[thread], static_cast<unsigned>(thread));
  std::vector<int> live;
  for (int first = 0; first < threads; first += 32) live.push_back(first);
  while (!live.empty() && e.error.empty()) {
    const int pick = random.below(static_cast<int>(live.size()));
    if (step_warp(live[pick], std::min(32, threads - live[pick]), random)) {
      live[pick] = live.back();
      live.pop_back();
    }
  }
}

// "backward_kernel<float, 4, true>" for the function at `kernel` (its exported symbol), else "a kernel".
inline std::string kernel_name(const void* kernel) {
  Dl_info info;
  if (dladdr(kernel, &info) == 0 || info.dli_sname == nullptr || info.dli_saddr != kernel) return "a kernel";
  int status = 0;
  char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string name = status == 0 ? demangled : info.dli_sname;
  std::free(demangled);
  int depth = 0;
  size_t cut = name.size(), start = 0;
  for (size_t i = 0; i < name.size(); ++i) {  // drop the parameter list and the namespaces
    const char c = name[i];
    if (c == '<') ++depth;
    if (c == '>') --depth;
    if (depth == 0 && c == '(') {
      cut = i;
      break;
    }
    if (depth == 0 && c == ':') start = i + 1;
  }
  name = name.substr(start, cut - start);
  return name.rfind("void ", 0) == 0 ? name.substr(5) : name;
}

// The seed of the next launch: MSDA_EMULATION_SEED (or set_seed) fixes it for every launch, else a fresh one each.
inline uint64_t launch_seed() {
  Emulator& e = emulator();
  if (!e.seeded) {
    e.seeded = true;
    const char* fixed = std::getenv("MSDA_EMULATION_SEED");
    e.fixed_seed = fixed != nullptr && *fixed != '\0';
    e.seed = e.fixed_seed ? std::strtoull(fixed, nullptr, 10) : std::random_device{}();
  }
  if (e.fixed_seed) return e.seed;
  Random advance{e.seed};
  e.seed = advance.next();
  return e.seed & 0xffffffffffffull;  // 48 bits: short enough to type
}

// Binds the tensors of the next launch: every global pointer of a kernel argument must point into one of them.
inline void bind(std::vector<BoundTensor> tensors) {
  Emulator& e = emulator();
  e.tensors = std::move(tensors);
}

// Launches `body` (a call of the __global__ function at `kernel`) on every thread of a one-dimensional grid.
inline void launch(const void* kernel, int64_t blocks, int threads, const std::function<void()>& body) {
  Emulator& e = emulator();
  if (blocks * threads > INT32_MAX) throw std::runtime_error("emulated CUDA kernel: launch too large to emulate");
  e.body = &body;
  e.error.clear();
  e.kernel = kernel_name(kernel);
  e.launch_seed = launch_seed();
  e.grid_dim.x = static_cast<unsigned>(blocks);
  e.block_dim.x = static_cast<unsigned>(threads);
  for (BoundTensor& tensor : e.tensors) {
    tensor.history.assign(tensor.role == Role::kInput ? 0 : (tensor.end - tensor.begin) / tensor.element_size, {});
  }
  Random random{e.launch_seed};
  std::vector<int64_t> order(blocks);
  for (int64_t block = 0; block < blocks; ++block) order[block] = block;
  random.shuffle(order);
  for (int64_t block : order) {
    if (!e.error.empty()) break;
    e.block_index.x = static_cast<unsigned>(block);
    run_block(threads, random);
  }
  for (const BoundTensor& tensor : e.tensors) {
    if (tensor.role != Role::kOutput || !e.error.empty()) continue;
    for (size_t element = 0; element < tensor.history.size(); ++element) {
      const History& h = tensor.history[element];
      if (h.writer < 0 && h.atomics[0] < 0) {
        fail("output " + tensor.name + "[" + std::to_string(element) + "] was never written");
        break;
      }
    }
  }
  e.body = nullptr;
  ++e.launches;
  if (!e.error.empty()) {
    const std::string seed = std::to_string(e.launch_seed);
    throw std::runtime_error("emulated CUDA kernel " + e.kernel + " (seed " + seed +
                             ", replay with MSDA_EMULATION_SEED=" + seed + "): " + e.error);
  }
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

// The atomics add at an address MSDA_ADDRESS checked (and logged as an atomic access); lanes never run at once,
// so a plain add is atomic here.
template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

inline float2 atomicAdd(float2* address, float2 value) {
  const float2 old = *address;
  *address = {old.x + value.x, old.y + value.y};
  return old;
}

inline float4 atomicAdd(float4* address, float4 value) {
  const float4 old = *address;
  *address = {old.x + value.x, old.y + value.y, old.z + value.z, old.w + value.w};
  return old;
}

template <typename T>
using GlobalPointer = ::msda_emulation::TrackedPointer<T>;

#define MSDA_ADDRESS(pointer, bytes, kind) \
  ::msda_emulation::checked_address(pointer, bytes, ::msda_emulation::Access::k##kind)
// Both atomic paths are compiled; set_architecture chooses sm_90's vector atomics or sm_80's scalar ones.
#define MSDA_HAS_VECTOR_ATOMICS 1
#define MSDA_USE_VECTOR_ATOMICS (::msda_emulation::emulator().vector_atomics)
#ifdef MSDA_MUTATIONS
#define MSDA_MUTATION(name) (::msda_emulation::mutation_is(::msda_emulation::Mutation::name))
#endif
