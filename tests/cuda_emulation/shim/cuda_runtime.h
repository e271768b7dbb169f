// cuda_runtime.h for the CUDA emulator (tests/cuda_emulation/emulator.py): the subset of CUDA that
// dynseg's kernels use, on the CPU. A kernel launch runs its blocks one after another, each block as
// real threads (one per CUDA thread) with barriers for __syncthreads and __syncwarp, so __shared__
// (made static) belongs to the running block. Device memory is host memory. It checks the kernels'
// logic (indexing, ordering, reductions, races within a block) and not the hardware's behaviour:
// timing, memory limits and the memory model of a real GPU are for the GPU tests.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static  // one block runs at a time
#define __restrict__

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3 { unsigned x = 0, y = 0, z = 0; };
struct float4 { float x, y, z, w; };

namespace emu {
struct Block {
    std::unique_ptr<std::barrier<>> all;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<uint64_t> exchange;  // 32 lanes per warp, 8 bytes each
};
inline thread_local Block* block = nullptr;
inline std::vector<char> dynamic_shared;
}  // namespace emu

inline thread_local uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline void __syncthreads() { emu::block->all->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::block->warps[threadIdx.x / 32]->arrive_and_wait(); }
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int offset) {
    static_assert(sizeof(T) <= 8);
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    emu::block->exchange[warp * 32 + lane] = bits;
    __syncwarp();
    bits = emu::block->exchange[warp * 32 + (lane ^ offset)];
    __syncwarp();
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}
inline int atomicMin(int* p, int v) {
    std::atomic_ref<int> a(*p);
    int old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {}
    return old;
}
inline int atomicMax(int* p, int v) {
    std::atomic_ref<int> a(*p);
    int old = a.load();
    while (v > old && !a.compare_exchange_weak(old, v)) {}
    return old;
}
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long expected, unsigned long long desired) {
    std::atomic_ref<unsigned long long>(*p).compare_exchange_strong(expected, desired);
    return expected;  // the value found: desired's predecessor on success
}
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned v; std::memcpy(&v, &f, 4); return v; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
template <class A, class B> inline auto min(A a, B b) { return a < b ? a : b; }
template <class A, class B> inline auto max(A a, B b) { return a > b ? a : b; }

// ---- the runtime ----
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;  // named by TensorRT's headers
enum cudaError_t {
    cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2, cudaErrorInsufficientDriver = 35,
    cudaErrorInvalidDeviceFunction = 98, cudaErrorNoKernelImageForDevice = 209, cudaErrorUnsupportedPtxVersion = 222
};
#define CUDART_VERSION 13000
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice, cudaMemcpyDefault };
enum cudaDeviceAttr {
    cudaDevAttrMultiProcessorCount = 16, cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76
};
struct cudaFuncAttributes { int binaryVersion, ptxVersion; };
// DYNSEG_EMULATED_GPU picks a failure for the tests of the messages: "without-kernels", a GPU the
// build has no kernels for; "without-driver", a runtime that cannot count the GPUs.
inline bool emulated_gpu_is(const char* what) {
    const char* value = std::getenv("DYNSEG_EMULATED_GPU");
    return value && std::strcmp(value, what) == 0;
}
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
constexpr unsigned cudaStreamNonBlocking = 1;
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
inline const char* cudaGetErrorName(cudaError_t e) {
    return e == cudaErrorNoKernelImageForDevice ? "cudaErrorNoKernelImageForDevice"
           : e == cudaErrorInsufficientDriver   ? "cudaErrorInsufficientDriver"
                                                : "cudaErrorEmulated";
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) {
    *n = emulated_gpu_is("without-driver") ? 0 : 1;
    return *n ? cudaSuccess : cudaErrorInsufficientDriver;
}
// One SM: grids stay small (blocks are threads here), and every grid-stride loop takes several turns.
// Compute capability 9.0.
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attribute, int) {
    *v = attribute == cudaDevAttrComputeCapabilityMajor ? 9 : attribute == cudaDevAttrComputeCapabilityMinor ? 0 : 1;
    return cudaSuccess;
}
template <class F> inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, F) {
    *attributes = {};
    return emulated_gpu_is("without-kernels") ? cudaErrorNoKernelImageForDevice : cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) { std::memset(p, v, n); return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t = nullptr) {
    std::memmove(d, s, n);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) { std::memmove(d, s, n); return cudaSuccess; }
inline cudaError_t cudaMalloc(void** p, size_t n) {
    *p = std::aligned_alloc(256, (n + 255) / 256 * 256 + 256);
    if (*p) std::memset(*p, 0xcd, n);  // not zero, as device memory is not
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFree(void* p) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { *s = nullptr; return cudaSuccess; }
inline cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
template <class F> inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }

namespace emu {
// Workers that run the threads of every launch (created once: a kernel launch is too frequent to
// start threads for), with the launching thread as the extra party of the start and end barriers.
class Workers {
public:
    static constexpr unsigned kCount = 256;  // the largest block dynseg launches
    static Workers& get() {
        static Workers* workers = new Workers;  // never destroyed: its threads wait until the process ends
        return *workers;
    }
    void run(const std::function<void(unsigned)>& job) {
        std::lock_guard<std::mutex> lock(mutex_);
        job_ = &job;
        start_.arrive_and_wait();
        end_.arrive_and_wait();
    }

private:
    Workers() {
        for (unsigned t = 0; t < kCount; ++t)
            std::thread([this, t] {
                for (;;) {
                    start_.arrive_and_wait();
                    (*job_)(t);
                    end_.arrive_and_wait();
                }
            }).detach();
    }
    std::mutex mutex_;
    const std::function<void(unsigned)>* job_ = nullptr;
    std::barrier<> start_{kCount + 1}, end_{kCount + 1};
};

// kernel<<<grid, block, shared, stream>>>(args) becomes launch([&] { kernel(args); }, grid, block, ...).
// Worker t is thread t of every block, block after block; each block gets fresh barriers (a thread
// that returns leaves them, as on a GPU), and all of its threads finish before the next block starts,
// so "static" __shared__ memory is the running block's.
template <class F>
void launch(F&& body, dim3 grid, dim3 blk, size_t shared = 0, cudaStream_t = nullptr) {
    if (blk.x > Workers::kCount) std::abort();
    static std::mutex one_at_a_time;  // gridDim, blockDim and the shared memory are every launch's
    const std::lock_guard<std::mutex> hold(one_at_a_time);
    gridDim = grid;
    blockDim = blk;
    dynamic_shared.assign(shared + 16, 0x5a);  // extern __shared__ memory: not zero either
    const unsigned n = blk.x, warps = (n + 31) / 32;
    const unsigned count = grid.x * grid.y * grid.z;
    std::vector<Block> blocks(count);
    for (Block& state : blocks) {
        state.all = std::make_unique<std::barrier<>>(n);
        for (unsigned w = 0; w < warps; ++w) state.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w)));
        state.exchange.assign(warps * 32, 0);
    }
    std::barrier<> block_done(n);
    const std::function<void(unsigned)> job = [&](unsigned t) {
        if (t >= n) return;
        threadIdx = {t, 0, 0};
        for (unsigned b = 0; b < count; ++b) {
            block = &blocks[b];
            blockIdx = {b % grid.x, b / grid.x % grid.y, b / (grid.x * grid.y)};
            body();
            blocks[b].warps[t / 32]->arrive_and_drop();
            blocks[b].all->arrive_and_drop();
            block_done.arrive_and_wait();
        }
    };
    Workers::get().run(job);
}
}  // namespace emu
