// common.cuh: what every CUDA kernel file shares: launch geometry, grid-stride loops, float4
// arithmetic in the CPU kernels' order of operations, and the problem-wide status block.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <stdexcept>

#include "../kernel_features.h"

namespace dynseg {
namespace cuda {

constexpr int kThreads = 256;
// Per-pixel rows of the pixel-major arrays are padded to whole float4s (the CPU kernel's, in
// dynseg::padded_to_vec8, to its 8-float vectors); the padding stays zero.
inline int64_t padded_to_float4(int64_t channels) { return (channels + 3) / 4 * 4; }

// Launch geometry of one call: grid-stride loops over at most `blocks_cap` blocks, which also lets
// kernels whose item count lives on the device (a lattice's vertex count) launch without reading it.
struct Launch {
    cudaStream_t stream;
    int blocks_cap;

    int blocks(int64_t items) const {
        return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, blocks_cap)));
    }
};

// 32-bit indices: 64-bit division costs several times more, and the entry points keep every count
// these loops see below 2^31 (check_arguments in c_api.cu).
#define DYNSEG_FOR_EACH(i, count)                                                                  \
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x, i##_count = static_cast<uint32_t>(count); \
         i < i##_count; i += gridDim.x * blockDim.x)

__device__ inline float4 operator+(float4 a, float4 b) { return {a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w}; }
__device__ inline float4 operator*(float s, float4 a) { return {s * a.x, s * a.y, s * a.z, s * a.w}; }
__device__ inline float4 operator*(float4 a, float s) { return {a.x * s, a.y * s, a.z * s, a.w * s}; }
__device__ inline float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ inline void store4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }

// A read-only random-access iterator whose i-th value is f(i): a CUB scan reads its input through
// it, computed on the fly, instead of from an array that one more launch would have to fill.
template <class F>
struct IndexedValues {
    using value_type = int32_t;
    using reference = int32_t;
    using pointer = const int32_t*;
    using difference_type = std::ptrdiff_t;
    using iterator_category = std::random_access_iterator_tag;

    F f;
    difference_type i = 0;

    __host__ __device__ int32_t operator*() const { return f(i); }
    __host__ __device__ int32_t operator[](difference_type k) const { return f(i + k); }
    __host__ __device__ IndexedValues operator+(difference_type k) const { return {f, i + k}; }
    __host__ __device__ IndexedValues operator-(difference_type k) const { return {f, i - k}; }
    __host__ __device__ difference_type operator-(const IndexedValues& other) const { return i - other.i; }
    __host__ __device__ IndexedValues& operator+=(difference_type k) { i += k; return *this; }
    __host__ __device__ IndexedValues& operator-=(difference_type k) { i -= k; return *this; }
    __host__ __device__ IndexedValues& operator++() { ++i; return *this; }
    __host__ __device__ IndexedValues operator++(int) { IndexedValues old = *this; ++i; return old; }
    __host__ __device__ IndexedValues& operator--() { --i; return *this; }
    __host__ __device__ bool operator==(const IndexedValues& other) const { return i == other.i; }
    __host__ __device__ bool operator!=(const IndexedValues& other) const { return i != other.i; }
    __host__ __device__ bool operator<(const IndexedValues& other) const { return i < other.i; }
};

// A CUDA runtime call that failed inside the host code of a plan or a build, where no status can be
// returned (CUB's calls report only through their return value): the entry points report it as
// DYNSEG_ERROR_CUDA.
struct CudaError : std::runtime_error {
    cudaError_t code;
    CudaError(cudaError_t failed, const char* operation) : std::runtime_error(operation), code(failed) {}
};

// The first words of every CUDA call's workspace: zeros, or why a lattice could not be built and
// whether a result came out NaN or infinite, for dynseg_crf_check_cuda to report after the fact (a
// compute call cannot wait for the device).
struct Status {
    int32_t code;       // 0, or kFeaturesTooLarge / kKeysTooWide
    int32_t kernel;     // the kernel whose lattice failed
    int32_t bits;       // key bits it needed
    float largest;      // its largest scaled feature
    int32_t nonfinite;  // 1 if a result the call wrote holds NaN or infinity (while code is 0)
};
constexpr int32_t kFeaturesTooLarge = 1;
constexpr int32_t kKeysTooWide = 2;

// Called by the kernels that write a call's results, on each value they write: device inputs the
// call could not check, or an overflow, reach the results as NaN or infinity, and
// dynseg_crf_check_cuda reports them. (A failed lattice's NaN results are reported as that failure.)
__device__ inline void note_if_nonfinite(Status* status, float value) {
    if ((__float_as_int(value) & 0x7f800000) == 0x7f800000) atomicMax(&status->nonfinite, 1);  // all-ones exponent
}

}  // namespace cuda
}  // namespace dynseg
