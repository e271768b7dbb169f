// lattice.cu: building the permutohedral lattice and filtering through it on the GPU (lattice.cuh
// says how; plugins/src/lattice.cpp is the CPU twin whose float operations the embedding repeats).
#include "lattice.cuh"

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <climits>
#include <cmath>
#include <stdexcept>

#include "../kernel_features.h"

namespace dynseg {
namespace cuda {
namespace {

// Entries summed by one thread in the first splat pass. Measured on an H200 (docs/benchmarks.md):
// 16 and 32 were slower per iteration, and 128 too.
constexpr int32_t kChunk = 64;
// Beyond any coordinate of a lattice that can be built (|features| < 2^22), far from int32's limits.
constexpr float kCoordinateClamp = 1073741824.0f;  // 2^30

struct EmbedConstants {
    float scale[kMaxFeatureDim];
    float inv_dp1, dp1, alpha;
    float theta_xy, theta_color;
    int64_t width, pixels;
    int32_t channels, d;
};

// D = d when known at compile time (spatial 2, RGB bilateral 5), 0 otherwise; arrays then hold the
// largest lattice, and the loops run to the runtime d. With D known, a block's outputs go through
// shared memory: its pixels' entries are one stretch of each output array, written coalesced, where
// a thread's own d+1 entries would put each store of a warp on 32 rows 4(d+1) bytes apart.
template <int D>
__global__ void embed(EmbedConstants c, const float* image, int32_t* rem0_out, int32_t* rank_out, float* weight_out,
                      float* slice_out, int32_t* range) {
    constexpr int A = (D > 0 ? D : kMaxFeatureDim) + 1;
    constexpr bool kStaged = D > 0;
    __shared__ int32_t staged_int[kStaged ? 2 * kThreads * A : 1];  // rem0, then rank
    __shared__ float staged_float[kStaged ? 2 * kThreads * A : 1];  // weight, then slice weight
    const int d = D > 0 ? D : c.d;
    int32_t lo[A], hi[A];
    for (int i = 0; i < A; ++i) {
        lo[i] = INT_MAX;
        hi[i] = INT_MIN;
    }
    float largest = 0.0f;
    // a block-uniform loop: every thread reaches the staging barriers
    for (int64_t first = int64_t(blockIdx.x) * kThreads; first < c.pixels; first += int64_t(gridDim.x) * kThreads) {
        const uint32_t p = static_cast<uint32_t>(first + threadIdx.x);
        if (p < c.pixels) {
            float f[A];
            const uint32_t width = static_cast<uint32_t>(c.width);
            f[0] = static_cast<float>(p % width) / c.theta_xy;
            f[1] = static_cast<float>(p / width) / c.theta_xy;
            // a compile-time trip count when D is known keeps f in registers
            const int channels = D > 0 ? D - 2 : c.channels;
            for (int ch = 0; ch < channels; ++ch) f[2 + ch] = image[ch * c.pixels + p] / c.theta_color;

            float elevated[A];
            float sm = 0.0f;
            for (int j = d; j > 0; --j) {
                const float cf = f[j - 1] * c.scale[j - 1];
                largest = fmaxf(largest, fabsf(cf));
                elevated[j] = sm - static_cast<float>(j) * cf;
                sm += cf;
            }
            elevated[0] = sm;

            // round half to even: adding 1.5·2^23 leaves no fraction bits (the build has no FMA contraction)
            const float shifter = 12582912.0f;
            float rem0[A], rank[A], sum = 0.0f;
            for (int i = 0; i <= d; ++i) {
                const float v = (c.inv_dp1 * elevated[i] + shifter) - shifter;
                rem0[i] = v * c.dp1;
                sum += v;
                rank[i] = 0.0f;
            }
            for (int i = 0; i < d; ++i) {
                const float di = elevated[i] - rem0[i];
                for (int j = i + 1; j <= d; ++j) {
                    const bool less = di < elevated[j] - rem0[j];
                    rank[i] += less ? 1.0f : 0.0f;
                    rank[j] += less ? 0.0f : 1.0f;
                }
            }
            for (int i = 0; i <= d; ++i) {
                rank[i] += sum;
                const float fix = (rank[i] < 0.0f ? c.dp1 : 0.0f) - (rank[i] >= c.dp1 ? c.dp1 : 0.0f);
                rank[i] += fix;
                rem0[i] += fix;
            }
            float v[A], weight[A];
            for (int i = 0; i <= d; ++i) v[i] = (elevated[i] - rem0[i]) * c.inv_dp1;
            float last = 0.0f;
            for (int q = 0; q <= d + 1; ++q) {
                float plus = 0.0f, minus = 0.0f;
                for (int i = 0; i <= d; ++i) {
                    plus += rank[i] == static_cast<float>(d - q) ? v[i] : 0.0f;
                    minus += rank[i] == static_cast<float>(d - q + 1) ? v[i] : 0.0f;
                }
                if (q <= d)
                    weight[q] = plus - minus;
                else
                    last = plus - minus;
            }
            weight[0] += 1.0f + last;
            // A NaN image value (device memory is not checked) leaves no NaN in the weights: its ranks
            // compare false everywhere. NaN weights make the results NaN, which dynseg_crf_check_cuda
            // reports as an input that was not valid, as the header says.
            if (sm != sm)
                for (int i = 0; i <= d; ++i) weight[i] = __int_as_float(0x7fc00000);

            for (int i = 0; i <= d; ++i) {
                // A lattice whose features are too large fails on `largest` (plan_packing), but its
                // entries are computed all the same: clamped (a no-op for a lattice that can be built),
                // its coordinates convert and subtract within int32 and its ranks index within 0..d.
                // A NaN feature's pixel sits at 0 rather than at the clamp, which would widen the keys
                // past 63 bits (a key-range error blaming the thetas); its NaN weights (below) report it.
                const float at = rem0[i] == rem0[i] ? rem0[i] : 0.0f;
                const int32_t r0 = static_cast<int32_t>(fminf(fmaxf(at, -kCoordinateClamp), kCoordinateClamp));
                const int32_t rk = static_cast<int32_t>(fminf(fmaxf(rank[i], 0.0f), static_cast<float>(d)));
                if (kStaged) {
                    const int k = threadIdx.x * (d + 1) + i;
                    staged_int[k] = r0;
                    staged_int[kThreads * A + k] = rk;
                    staged_float[k] = weight[i];
                    staged_float[kThreads * A + k] = weight[i] * c.alpha;
                } else {
                    const int64_t e = int64_t(p) * (d + 1) + i;
                    rem0_out[e] = r0;
                    rank_out[e] = rk;
                    weight_out[e] = weight[i];
                    slice_out[e] = weight[i] * c.alpha;
                }
                if (i < d) {
                    lo[i] = min(lo[i], r0 - rk);
                    hi[i] = max(hi[i], r0 + d - rk);
                }
            }
        }
        if (kStaged) {
            __syncthreads();
            const int count = static_cast<int>(min(int64_t(kThreads), c.pixels - first)) * (d + 1);
            const int64_t e = first * (d + 1);
            for (int k = threadIdx.x; k < count; k += kThreads) {
                rem0_out[e + k] = staged_int[k];
                rank_out[e + k] = staged_int[kThreads * A + k];
                weight_out[e + k] = staged_float[k];
                slice_out[e + k] = staged_float[kThreads * A + k];
            }
            __syncthreads();
        }
    }
    // warp, then block, then one atomic per block and coordinate: the coordinate ranges are a
    // handful of addresses that thousands of warps would otherwise queue on
    for (int offset = 16; offset > 0; offset /= 2) {
        for (int i = 0; i < d; ++i) {
            lo[i] = min(lo[i], __shfl_xor_sync(0xffffffffu, lo[i], offset));
            hi[i] = max(hi[i], __shfl_xor_sync(0xffffffffu, hi[i], offset));
        }
        largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, offset));
    }
    constexpr int kWarps = kThreads / 32;
    __shared__ int32_t block_lo[kWarps][kMaxFeatureDim], block_hi[kWarps][kMaxFeatureDim];
    __shared__ float block_largest[kWarps];
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
        for (int i = 0; i < d; ++i) {
            block_lo[warp][i] = lo[i];
            block_hi[warp][i] = hi[i];
        }
        block_largest[warp] = largest;
    }
    __syncthreads();
    // Range holds maxima only (-low, high, the largest's float bits, which order as ints when
    // non-negative), so that one memset clears it before the embedding.
    const int t = threadIdx.x;
    if (t < d) {
        int32_t v = block_lo[0][t];
        for (int w = 1; w < kWarps; ++w) v = min(v, block_lo[w][t]);
        atomicMax(&range[t], -v);
    } else if (t < 2 * d) {
        int32_t v = block_hi[0][t - d];
        for (int w = 1; w < kWarps; ++w) v = max(v, block_hi[w][t - d]);
        atomicMax(&range[kMaxFeatureDim + t - d], v);
    } else if (t == 2 * d) {
        float v = block_largest[0];
        for (int w = 1; w < kWarps; ++w) v = fmaxf(v, block_largest[w]);
        atomicMax(&range[2 * kMaxFeatureDim], __float_as_int(v));
    }
}

// The key packing from the coordinate ranges, or the reason there is none (into status, when given).
__device__ void plan_packing(int d, const int32_t* range, Packing* packing, Status* status, int kernel) {
    const float largest = __int_as_float(range[2 * kMaxFeatureDim]);
    int bits = 0;
    uint64_t ones = 0;
    for (int i = 0; i < d; ++i) {
        const int32_t low = -range[i], high = range[kMaxFeatureDim + i];
        const uint64_t span = static_cast<uint64_t>(static_cast<int64_t>(high) - low);
        int width = 1;
        while (width < 63 && (span >> width) != 0) ++width;
        packing->low[i] = low;
        packing->high[i] = high;
        packing->shift[i] = bits < 64 ? bits : 0;
        bits += width;
    }
    // Elevated coordinates are rounded through float: past 2^22 there are no fraction bits left.
    const bool features_ok = largest * static_cast<float>(2 * d) < 4194304.0f;
    // 63 bits keep the packed keys clear of overflow, and of the hash table's empty mark
    const bool ok = features_ok && bits <= 63;
    if (!ok) {
        for (int i = 0; i < d; ++i) packing->shift[i] = 0;
        if (status && status->code == 0) {
            status->code = !features_ok ? kFeaturesTooLarge : kKeysTooWide;
            status->kernel = kernel;
            status->bits = bits;
            status->largest = largest;
        }
    }
    for (int i = 0; ok && i < d; ++i) ones += 1ull << packing->shift[i];
    packing->ones = ones;
    packing->ok = ok;
}

// The vertex keys' hash table: open addressing with linear probing over a power of two of slots,
// more than the entries, so that every probe ends at the key or at an empty slot. Keys are claimed
// by compare-and-swap, so which slot a key lands in depends on the threads' timing; nothing
// downstream sees slots, only vertex ids, which come from each vertex's first entry.
constexpr uint64_t kEmptySlot = ~0ull;  // packed keys have at most 63 bits

__device__ inline uint32_t home_slot(uint64_t key, int slot_bits) {
    return static_cast<uint32_t>((key * 0x9E3779B97F4A7C15ull) >> (64 - slot_bits));  // Fibonacci hashing
}

__device__ inline uint32_t insert_key(uint64_t* table, int slot_bits, uint64_t key) {
    const uint32_t mask = (1u << slot_bits) - 1;
    for (uint32_t s = home_slot(key, slot_bits);; s = (s + 1) & mask) {
        // a slot changes once, from empty to its key: a stale read can only be "empty"
        uint64_t held = table[s];
        if (held == kEmptySlot)
            held = atomicCAS(reinterpret_cast<unsigned long long*>(table + s), kEmptySlot, key);
        if (held == kEmptySlot || held == key) return s;
    }
}

__device__ inline int32_t find_key(const uint64_t* table, int slot_bits, uint64_t key) {
    const uint32_t mask = (1u << slot_bits) - 1;
    for (uint32_t s = home_slot(key, slot_bits);; s = (s + 1) & mask) {
        const uint64_t held = table[s];
        // empty first: a failed lattice's neighbour keys are arbitrary, the empty mark among them
        if (held == kEmptySlot) return -1;
        if (held == key) return static_cast<int32_t>(s);
    }
}

__global__ void clear_table(uint64_t* table, int32_t* first_entry, int64_t slots) {
    DYNSEG_FOR_EACH(s, slots) {
        table[s] = kEmptySlot;
        first_entry[s] = INT_MAX;
    }
}

// The key of every (pixel, remainder r) entry, into the table, a thread each: vertex r of the
// pixel's simplex has coordinate rem0[i] + r, less d+1 where rank[i] > d - r (densecrf's canonical
// simplex), each packed above its coordinate's low end. Each slot keeps its smallest entry index.
// Without a packing every entry gets a key of its own, which keeps the lattice well-formed while its
// results are discarded. Every block plans the packing from the ranges itself (a launch less); block
// 0 publishes it and any failure.
__global__ void insert_entries(int d, int kernel, int64_t entries, const int32_t* range, const int32_t* rem0,
                               const int32_t* rank, int slot_bits, Packing* packing_out, Status* status,
                               uint64_t* table, int32_t* first_entry, int32_t* entry_slot, int32_t* entry_index) {
    __shared__ Packing packing;
    if (threadIdx.x == 0) {
        plan_packing(d, range, &packing, blockIdx.x == 0 ? status : nullptr, kernel);
        if (blockIdx.x == 0) *packing_out = packing;
    }
    __syncthreads();
    const bool ok = packing.ok;
    const uint32_t dp1 = d + 1;
    DYNSEG_FOR_EACH(e, entries) {
        uint64_t key = e;
        if (ok) {
            const uint32_t first = e - e % dp1;
            const int32_t r = static_cast<int32_t>(e % dp1);
            key = 0;
            for (int i = 0; i < d; ++i) {
                const int32_t coordinate = rem0[first + i] + r - (rank[first + i] > d - r ? d + 1 : 0);
                key |= static_cast<uint64_t>(coordinate - packing.low[i]) << packing.shift[i];
            }
        }
        const uint32_t s = insert_key(table, slot_bits, key);
        atomicMin(first_entry + s, static_cast<int32_t>(e));
        entry_slot[e] = static_cast<int32_t>(s);
        entry_index[e] = static_cast<int32_t>(e);
    }
}

// 1 for the first entry of each vertex: scanned, the vertex id + 1 at each first entry, so vertices
// are numbered in the order of their first entries (pixel order: deterministic).
struct FirstEntries {
    const int32_t* first_entry;
    const int32_t* entry_slot;
    __host__ __device__ int32_t operator()(int64_t e) const { return first_entry[entry_slot[e]] == e; }
};

// Every entry's vertex id; each vertex's key; the vertex count.
__global__ void number_vertices(int64_t entries, const uint64_t* table, const int32_t* first_entry,
                                const int32_t* entry_slot, const int32_t* numbered, int32_t* entry_vertex,
                                uint64_t* vertex_key, int32_t* vertices) {
    DYNSEG_FOR_EACH(e, entries) {
        const int32_t s = entry_slot[e], first = first_entry[s], v = numbered[first] - 1;
        entry_vertex[e] = v;
        if (first == static_cast<int32_t>(e)) vertex_key[v] = table[s];
        if (e == entries - 1) *vertices = numbered[e];
    }
}

// The CSR of the splat matrix's transpose from the entries sorted by vertex (stably, so each
// vertex's entries stay in pixel order).
__global__ void fill_csr(int d, int64_t entries, const int32_t* sorted_vertex, const int32_t* sorted_entries,
                         const float* weight, int32_t* csr_begin, int32_t* csr_pixel, float* csr_weight) {
    DYNSEG_FOR_EACH(i, entries) {
        const int32_t v = sorted_vertex[i], e = sorted_entries[i];
        if (i == 0 || sorted_vertex[i - 1] != v) csr_begin[v] = static_cast<int32_t>(i);
        csr_pixel[i] = e / (d + 1);
        csr_weight[i] = weight[e];
        if (i == entries - 1) csr_begin[v + 1] = static_cast<int32_t>(entries);
    }
}

// The whole kChunk-entry chunks of each vertex slot (zero past the vertex count M): scanned, where
// each vertex's chunks end.
struct WholeChunks {
    const int32_t* vertices;
    const int32_t* csr_begin;
    __host__ __device__ int32_t operator()(int64_t v) const {
        return v < *vertices ? (csr_begin[v + 1] - csr_begin[v]) / kChunk : 0;
    }
};

// The first sorted entry of every whole chunk of kChunk entries (WholeChunks counts them).
__global__ void place_chunks(const int32_t* vertices, const int32_t* csr_begin, const int32_t* chunk_end,
                             int32_t* chunk_first, int32_t* chunks) {
    const uint32_t m = *vertices;
    DYNSEG_FOR_EACH(v, m) {
        const int32_t last = chunk_end[v], n = last - (v > 0 ? chunk_end[v - 1] : 0);
        for (int32_t k = 0; k < n; ++k) chunk_first[last - n + k] = csr_begin[v] + k * kChunk;
        if (v == m - 1) *chunks = last;
    }
}

// The vertex id of key, or -1 if the lattice has no such vertex.
__device__ inline int32_t find_vertex(const uint64_t* table, int slot_bits, const int32_t* first_entry,
                                      const int32_t* numbered, uint64_t key) {
    const int32_t s = find_key(table, slot_bits, key);
    return s < 0 ? -1 : numbered[first_entry[s]] - 1;
}

// Blur neighbours along each lattice axis j: every coordinate -1 except j, which moves +d (and the
// mirror image); for j = d the moved coordinate is the implied one. A neighbour with a coordinate
// outside the packed range cannot exist and is not looked up.
__global__ void find_neighbours(int d, int64_t entries, const int32_t* vertices, const Packing* packing,
                                const uint64_t* vertex_key, const uint64_t* table, int slot_bits,
                                const int32_t* first_entry, const int32_t* numbered, int32_t* neighbours) {
    const int32_t m = *vertices;  // the zero row's index
    DYNSEG_FOR_EACH(v, m) {
        const uint64_t packed = vertex_key[v];
        int32_t key[kMaxFeatureDim];
        int at_low = 0, at_high = 0;
        for (int i = 0; i < d; ++i) {
            const int next = i + 1 < d ? packing->shift[i + 1] : 64;
            const int width = next - packing->shift[i];
            const uint64_t mask = width >= 64 || width <= 0 ? ~0ull : ((1ull << width) - 1);
            key[i] = static_cast<int32_t>((packed >> packing->shift[i]) & mask) + packing->low[i];
            at_low += key[i] - 1 < packing->low[i];
            at_high += key[i] + 1 > packing->high[i];
        }
        for (int j = 0; j <= d; ++j) {
            uint64_t k1 = packed - packing->ones, k2 = packed + packing->ones;
            bool ok1, ok2;
            if (j < d) {
                const uint64_t step = static_cast<uint64_t>(d + 1) << packing->shift[j];
                k1 += step;
                k2 -= step;
                ok1 = at_low - (key[j] - 1 < packing->low[j]) == 0 && key[j] + d <= packing->high[j];
                ok2 = at_high - (key[j] + 1 > packing->high[j]) == 0 && key[j] - d >= packing->low[j];
            } else {
                ok1 = at_low == 0;
                ok2 = at_high == 0;
            }
            const int32_t id1 = ok1 ? find_vertex(table, slot_bits, first_entry, numbered, k1) : -1;
            const int32_t id2 = ok2 ? find_vertex(table, slot_bits, first_entry, numbered, k2) : -1;
            int32_t* out = neighbours + (j * entries + v) * 2;
            out[0] = id1 < 0 ? m : id1;
            out[1] = id2 < 0 ? m : id2;
        }
    }
}

// Filtering runs every lattice of a call side by side: one launch per pass serves all of them, with
// blockIdx.y picking the lattice (so a block's lattice is uniform) and the x blocks striding over its
// items. Lattices take turns only in the slice, which sums their messages per pixel in kernel order.
struct Group {
    int count;
    LatticeView at[DYNSEG_MAX_KERNELS];
};

// What a splat reads: pre_k ⊙ in, columns [c0, c0 + width) of rows of `stride` floats; pre is
// (lattices, N) or null.
struct SplatInput {
    const float* in;
    int64_t stride, c0;
    const float* pre;
    int64_t pixels;
};

// Splat as a gather over the CSR, in two passes so that no thread sums a long list alone: a vertex of
// an image's flat region can own thousands of entries. Pass 1 sums each chunk of kChunk entries of
// the vertices that have more than kChunk; pass 2 gives each vertex a warp whose lanes take every
// `streams`-th entry (small vertices) or chunk sum (large ones) and adds the streams in a fixed order.
// Fixed partitions and orders: the sums are the same bits on every run. Rows are `width` floats.

// The value of entry s (sorted position): its weight times its pixel's row (times pre), or its weight
// alone when ONES.
template <bool ONES>
__device__ inline float4 entry_value(const LatticeView& l, int32_t s, const SplatInput& x, const float* pre,
                                     int64_t c) {
    const float w = l.csr_weight[s];
    if (ONES) return w * float4{1.0f, 1.0f, 1.0f, 1.0f};
    const int64_t p = l.csr_pixel[s];
    float4 v = load4(x.in + p * x.stride + x.c0 + c);
    if (pre) v = v * pre[p];
    return w * v;
}

template <bool ONES>
__global__ void chunk_sums(Group g, SplatInput x, int64_t width) {
    const LatticeView& l = g.at[blockIdx.y];
    const float* pre = x.pre ? x.pre + blockIdx.y * x.pixels : nullptr;
    const int64_t quads = width / 4;
    DYNSEG_FOR_EACH(i, int64_t(*l.chunks) * quads) {
        const uint32_t j = i / uint32_t(quads), c = 4 * (i % uint32_t(quads));
        const int32_t first = l.chunk_first[j];  // whole chunks by construction
        float4 acc = {0.0f, 0.0f, 0.0f, 0.0f};
        // 16 gathers in flight per thread: the pass waits on memory, not on arithmetic
#pragma unroll 16
        for (int32_t s = 0; s < kChunk; ++s) acc = acc + entry_value<ONES>(l, first + s, x, pre, c);
        store4(l.partial + j * width + c, acc);
    }
}

template <bool ONES>
__global__ void vertex_sums(Group g, SplatInput x, int64_t width) {
    __shared__ float4 lanes[kThreads];
    const LatticeView& l = g.at[blockIdx.y];
    const float* pre = x.pre ? x.pre + blockIdx.y * x.pixels : nullptr;
    float* values = l.values[0];
    const int64_t m = *l.vertices;
    const int quads = static_cast<int>(width / 4), streams = 32 / quads;
    const int lane = threadIdx.x % 32, s = lane / quads, c = 4 * (lane % quads);
    float4* warp = lanes + (threadIdx.x - lane);
    const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
    for (int64_t v = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32; v <= m; v += warps) {
        float4 acc = {0.0f, 0.0f, 0.0f, 0.0f};
        if (v < m && s < streams) {
            const int32_t begin = l.csr_begin[v], end = l.csr_begin[v + 1];
            const int32_t chunks = l.chunk_end[v] - (v > 0 ? l.chunk_end[v - 1] : 0);
            if (chunks == 0) {
                for (int32_t e = begin + s; e < end; e += streams) acc = acc + entry_value<ONES>(l, e, x, pre, c);
            } else {
                const int64_t first = l.chunk_end[v] - chunks;
                for (int32_t k = s; k < chunks; k += streams) acc = acc + load4(l.partial + (first + k) * width + c);
                // the tail past the last whole chunk
                for (int32_t e = begin + chunks * kChunk + s; e < end; e += streams)
                    acc = acc + entry_value<ONES>(l, e, x, pre, c);
            }
        }
        warp[lane] = acc;
        __syncwarp();
        if (s == 0) {
            for (int t = 1; t < streams; ++t) acc = acc + warp[t * quads + lane];
            store4(values + v * width + c, acc);
        }
        __syncwarp();
    }
}

// Blur step `step` of every lattice that has one (d+1 steps each, along axis step, or d - step when
// transposed), from value buffer step % 2 into the other one.
__global__ void blur_step(Group g, int step, bool transpose, int64_t width) {
    const LatticeView& l = g.at[blockIdx.y];
    if (step > l.d) return;
    const int axis = transpose ? l.d - step : step;
    const int32_t* neighbours = l.neighbours + axis * l.entries * 2;
    const float* values = l.values[step % 2];
    float* next = l.values[(step + 1) % 2];
    const int64_t m = *l.vertices, quads = width / 4;
    DYNSEG_FOR_EACH(i, (m + 1) * quads) {
        const uint32_t v = i / uint32_t(quads), c = 4 * (i % uint32_t(quads));
        if (v == m) {
            store4(next + v * width + c, float4{0.0f, 0.0f, 0.0f, 0.0f});
            continue;
        }
        const float4 a = load4(values + int64_t(neighbours[2 * v]) * width + c);
        const float4 b = load4(values + int64_t(neighbours[2 * v + 1]) * width + c);
        store4(next + v * width + c, load4(values + v * width + c) + 0.5f * (a + b));
    }
}

// The blurred values of a lattice: in the buffer its d+1 blur steps ended in.
__device__ inline const float* blurred(const LatticeView& l) { return l.values[(l.d + 1) % 2]; }

// Pixel p's slice of lattice l: the weighted sum over its d+1 vertices (weights pre-scaled by alpha).
__device__ inline float4 slice_of(const LatticeView& l, uint32_t p, int64_t width, uint32_t c) {
    const float* values = blurred(l);
    float4 t = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int r = 0; r <= l.d; ++r) {
        const int64_t e = int64_t(p) * (l.d + 1) + r;
        t = t + l.slice_weight[e] * load4(values + int64_t(l.entry_vertex[e]) * width + c);
    }
    return t;
}

struct SliceOutputs {
    FilterOutput at[DYNSEG_MAX_KERNELS];
};

// Every lattice's slice, combined into the output in lattice order as its FilterOutput says (all of
// them write the same array): the same float operations as one slice after the other, one pass.
__global__ void slice(Group g, SliceOutputs outputs, int64_t pixels, int64_t width, int64_t stride, int64_t c0) {
    const int64_t quads = width / 4;
    DYNSEG_FOR_EACH(i, pixels * quads) {
        const uint32_t p = i / uint32_t(quads), c = 4 * (i % uint32_t(quads));
        float* o = outputs.at[0].out + p * stride + c0 + c;
        float4 result = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int k = 0; k < g.count; ++k) {
            const FilterOutput& output = outputs.at[k];
            float4 t = slice_of(g.at[k], p, width, c);
            if (output.scale) t = t * output.scale[p];
            switch (output.mode) {
                case FilterOutput::kStore: result = t; break;
                case FilterOutput::kAccumulate: result = (k == 0 ? load4(o) : result) + *output.weight * t; break;
                case FilterOutput::kFromBase:
                    result = load4(output.base + p * stride + c0 + c) + *output.weight * t;
                    break;
            }
        }
        store4(o, result);
    }
}

// CUB reports a failure (say, no usable device to size its storage for) only through its return value.
void check_cub(cudaError_t error, const char* what) {
    if (error != cudaSuccess) throw CudaError(error, what);
}

// n_k = 1/K_k(1) ("after") or 1/sqrt(K_k(1)) ("symmetric"): the slice of lane 0 of the ones filter,
// taken to the normalisation in double as the CPU does.
__global__ void slice_normalisers(Group g, float* out, int64_t pixels, bool symmetric) {
    const LatticeView& l = g.at[blockIdx.y];
    float* n = out + blockIdx.y * pixels;
    DYNSEG_FOR_EACH(p, pixels) {
        const double v = static_cast<double>(slice_of(l, p, 4, 0).x) + 1e-20;
        n[p] = static_cast<float>(symmetric ? 1.0 / sqrt(v) : 1.0 / v);
    }
}

int bit_width(uint64_t value) {
    int bits = 0;
    while (bits < 64 && (value >> bits) != 0) ++bits;
    return bits;
}

// log2 of the hash table's slots for a lattice of `entries` entries: a load of at most 0.8 when every
// entry is a vertex of its own (colour noise), far less on photos.
int slot_bits_for(int64_t entries) { return bit_width(static_cast<uint64_t>(entries + entries / 4)); }

}  // namespace

void BuildScratch::plan(Workspace& ws, int64_t max_entries) {
    const int64_t slots = int64_t(1) << slot_bits_for(max_entries);
    rem0 = ws.take<int32_t>(max_entries);
    rank = ws.take<int32_t>(max_entries);
    weight = ws.take<float>(max_entries);
    table = ws.take<uint64_t>(slots);
    first_entry = ws.take<int32_t>(slots);
    entry_slot = ws.take<int32_t>(max_entries);
    entries = ws.take<int32_t>(max_entries);
    numbered = ws.take<int32_t>(max_entries);
    sorted_vertex = ws.take<int32_t>(max_entries);
    sorted_entries = ws.take<int32_t>(max_entries);
    vertex_key = ws.take<uint64_t>(max_entries);
    range = ws.take<int32_t>(2 * kMaxFeatureDim + 1);
    size_t sort_bytes = 0, first_bytes = 0, chunks_bytes = 0;
    const int n = static_cast<int>(max_entries);
    check_cub(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const uint32_t*>(nullptr),
                                              static_cast<uint32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                              static_cast<int32_t*>(nullptr), n),
              "sizing the sort of the entries by vertex");
    check_cub(cub::DeviceScan::InclusiveSum(nullptr, first_bytes, IndexedValues<FirstEntries>{},
                                            static_cast<int32_t*>(nullptr), n),
              "sizing the vertex numbering scan");
    check_cub(cub::DeviceScan::InclusiveSum(nullptr, chunks_bytes, IndexedValues<WholeChunks>{},
                                            static_cast<int32_t*>(nullptr), n),
              "sizing the chunk scan");
    cub_bytes = std::max({sort_bytes, first_bytes, chunks_bytes});
    cub = ws.take<char>(static_cast<int64_t>(cub_bytes));
}

void Lattice::plan(Workspace& ws, const FeatureSpec& spec, int64_t value_width) {
    LatticeView& v = view_;
    v.d = spec.dim();
    pixels_ = spec.pixels();
    v.entries = pixels_ * (v.d + 1);
    slot_bits_ = slot_bits_for(v.entries);
    v.vertices = ws.take<int32_t>(1);
    packing_ = ws.take<Packing>(1);
    v.entry_vertex = ws.take<int32_t>(v.entries);
    v.slice_weight = ws.take<float>(v.entries);
    v.csr_begin = ws.take<int32_t>(v.entries + 1);
    v.csr_pixel = ws.take<int32_t>(v.entries);
    v.csr_weight = ws.take<float>(v.entries);
    v.neighbours = ws.take<int32_t>(v.entries * (v.d + 1) * 2);
    v.chunks = ws.take<int32_t>(1);
    v.chunk_end = ws.take<int32_t>(v.entries);
    v.chunk_first = ws.take<int32_t>(v.entries / kChunk + 1);
    value_width_ = value_width;
    v.partial = ws.take<float>((v.entries / kChunk + 1) * value_width);
    v.values[0] = ws.take<float>((v.entries + 1) * value_width);
    v.values[1] = ws.take<float>((v.entries + 1) * value_width);
}

void Lattice::build(const FeatureSpec& spec, BuildScratch& s, int kernel, Status* status, const Launch& launch) {
    const LatticeView& v = view_;
    const int d = v.d;
    EmbedConstants c{};
    for (int i = 0; i < d; ++i) c.scale[i] = feature_scale(d, i);
    c.inv_dp1 = 1.0f / static_cast<float>(d + 1);
    c.dp1 = static_cast<float>(d + 1);
    c.alpha = 1.0f / (1.0f + std::pow(2.0f, static_cast<float>(-d)));  // densecrf's slicing scale
    c.theta_xy = spec.theta_xy;
    c.theta_color = spec.theta_color > 0.0f ? spec.theta_color : 1.0f;
    c.width = spec.width;
    c.pixels = pixels_;
    c.channels = static_cast<int32_t>(spec.channels);
    c.d = d;

    cudaStream_t stream = launch.stream;
    const int64_t slots = int64_t(1) << slot_bits_;
    clear_table<<<launch.blocks(slots), kThreads, 0, stream>>>(s.table, s.first_entry, slots);
    // every range word is a maximum: 0x80 bytes are far below any (negated) coordinate or float bits
    cudaMemsetAsync(s.range, 0x80, (2 * kMaxFeatureDim + 1) * sizeof(int32_t), stream);
    const int blocks = launch.blocks(pixels_);
    if (d == 2)
        embed<2><<<blocks, kThreads, 0, stream>>>(c, spec.image, s.rem0, s.rank, s.weight, v.slice_weight, s.range);
    else if (d == 5)
        embed<5><<<blocks, kThreads, 0, stream>>>(c, spec.image, s.rem0, s.rank, s.weight, v.slice_weight, s.range);
    else
        embed<0><<<blocks, kThreads, 0, stream>>>(c, spec.image, s.rem0, s.rank, s.weight, v.slice_weight, s.range);

    const int entry_blocks = launch.blocks(v.entries);
    insert_entries<<<entry_blocks, kThreads, 0, stream>>>(d, kernel, v.entries, s.range, s.rem0, s.rank, slot_bits_,
                                                          packing_, status, s.table, s.first_entry, s.entry_slot,
                                                          s.entries);
    const int n = static_cast<int>(v.entries);
    size_t bytes = s.cub_bytes;
    check_cub(cub::DeviceScan::InclusiveSum(s.cub, bytes, IndexedValues<FirstEntries>{{s.first_entry, s.entry_slot}},
                                            s.numbered, n, stream),
              "the vertex numbering scan");
    number_vertices<<<entry_blocks, kThreads, 0, stream>>>(v.entries, s.table, s.first_entry, s.entry_slot, s.numbered,
                                                           v.entry_vertex, s.vertex_key, v.vertices);
    // vertex ids are below the entry count: a radix sort over those bits only
    bytes = s.cub_bytes;
    check_cub(cub::DeviceRadixSort::SortPairs(s.cub, bytes, reinterpret_cast<const uint32_t*>(v.entry_vertex),
                                              reinterpret_cast<uint32_t*>(s.sorted_vertex), s.entries,
                                              s.sorted_entries, n, 0, bit_width(static_cast<uint64_t>(v.entries)),
                                              stream),
              "the sort of the entries by vertex");
    fill_csr<<<entry_blocks, kThreads, 0, stream>>>(d, v.entries, s.sorted_vertex, s.sorted_entries, s.weight,
                                                    v.csr_begin, v.csr_pixel, v.csr_weight);
    find_neighbours<<<entry_blocks, kThreads, 0, stream>>>(d, v.entries, v.vertices, packing_, s.vertex_key, s.table,
                                                           slot_bits_, s.first_entry, s.numbered, v.neighbours);
    bytes = s.cub_bytes;
    check_cub(cub::DeviceScan::InclusiveSum(s.cub, bytes, IndexedValues<WholeChunks>{{v.vertices, v.csr_begin}},
                                            v.chunk_end, n, stream),
              "the chunk scan");
    place_chunks<<<entry_blocks, kThreads, 0, stream>>>(v.vertices, v.csr_begin, v.chunk_end, v.chunk_first, v.chunks);
}

namespace {

struct Shape {  // what the launches of a group are sized by: its largest lattice
    int64_t pixels = 0, entries = 0;
    int d = 0;
};

Group group_of(const Lattice* lattices, int count, Shape* shape) {
    if (count < 1 || count > DYNSEG_MAX_KERNELS) throw std::logic_error("a lattice group of 1 to 8 lattices");
    Group g{};
    g.count = count;
    for (int k = 0; k < count; ++k) {
        g.at[k] = lattices[k].view();
        shape->pixels = std::max(shape->pixels, g.at[k].entries / (g.at[k].d + 1));
        shape->entries = std::max(shape->entries, g.at[k].entries);
        shape->d = std::max(shape->d, g.at[k].d);
    }
    return g;
}

// Splat into every lattice's value buffer 0, then blur it into buffer (d+1) % 2.
template <bool ONES>
void splat_and_blur(const Group& g, const Shape& shape, const SplatInput& x, int64_t width, bool transpose,
                    const Launch& launch) {
    const int64_t quads = width / 4;
    chunk_sums<ONES><<<dim3(launch.blocks((shape.entries / kChunk + 1) * quads), g.count), kThreads, 0,
                       launch.stream>>>(g, x, width);
    vertex_sums<ONES><<<dim3(launch.blocks(32 * (shape.entries + 1)), g.count), kThreads, 0, launch.stream>>>(g, x,
                                                                                                            width);
    const dim3 blocks(launch.blocks((shape.entries + 1) * quads), g.count);
    for (int step = 0; step <= shape.d; ++step)
        blur_step<<<blocks, kThreads, 0, launch.stream>>>(g, step, transpose, width);
}

}  // namespace

void normalisers(const Lattice* lattices, int count, float* n, bool symmetric, const Launch& launch) {
    Shape shape;
    const Group g = group_of(lattices, count, &shape);
    splat_and_blur<true>(g, shape, SplatInput{}, 4, false, launch);  // one float4 per vertex; lane 0 is sliced
    slice_normalisers<<<dim3(launch.blocks(shape.pixels), count), kThreads, 0, launch.stream>>>(g, n, shape.pixels,
                                                                                                 symmetric);
}

void filter(const Lattice* lattices, int count, const float* in, int64_t stride, const float* pre, bool transpose,
            const FilterOutput* outputs, const Launch& launch) {
    Shape shape;
    const Group g = group_of(lattices, count, &shape);
    SplatInput x{in, stride, 0, pre, shape.pixels};
    SliceOutputs o{};
    for (int k = 0; k < count; ++k) {
        o.at[k] = outputs[k];
        // the slices add up in registers: one array, and every message after the first added to it
        if (k > 0 && (outputs[k].out != outputs[0].out || outputs[k].mode != FilterOutput::kAccumulate))
            throw std::logic_error("lattices filtered together must add their messages into one output");
    }
    const int64_t tile = lattices[0].value_width();
    for (int64_t c0 = 0; c0 < stride; c0 += tile) {
        const int64_t width = std::min(tile, stride - c0);
        x.c0 = c0;
        splat_and_blur<false>(g, shape, x, width, transpose, launch);
        slice<<<launch.blocks(shape.pixels * (width / 4)), kThreads, 0, launch.stream>>>(g, o, shape.pixels, width,
                                                                                        stride, c0);
    }
}

}  // namespace cuda
}  // namespace dynseg
