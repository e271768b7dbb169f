// lattice.cpp: building the permutohedral lattice and filtering values through it.
//
// The float operations of the embedding follow densecrf's order exactly (scale, elevate, round half
// to even, rank, barycentric weights), because the lattice is not permutation- or rounding-invariant:
// a different vertex for one pixel moves its filtered value at the 1e-3 level.
#include "lattice.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "kernel_features.h"
#include "parallel.h"
#include "simd.h"

namespace dynseg {
namespace {

// The thetas of a kernel as an error message names them: a spatial kernel (theta_color = 0) has no
// colour theta to blame.
struct KernelThetas {
    char text[96];
    explicit KernelThetas(const FeatureSpec& spec) {
        if (spec.theta_color > 0)
            std::snprintf(text, sizeof text, "the bilateral kernel's theta_xy = %g or theta_color = %g",
                          spec.theta_xy, spec.theta_color);
        else
            std::snprintf(text, sizeof text, "the spatial kernel's theta_xy = %g", spec.theta_xy);
    }
};

constexpr int64_t kPixelGrain = 2048;
constexpr int64_t kVertexGrain = 2048;
constexpr uint64_t kEmptySlot = std::numeric_limits<uint64_t>::max();

// The embedding of one pixel: for each remainder r = 0..d, the d integer coordinates of vertex r of
// the enclosing simplex and its barycentric weight.
struct Embedding {
    int d;
    float scale[kMaxFeatureDim];
    float inv_dp1;
    float dp1;

    explicit Embedding(int dim) : d(dim) {
        for (int i = 0; i < d; ++i) scale[i] = feature_scale(d, i);
        inv_dp1 = 1.0f / static_cast<float>(d + 1);
        dp1 = static_cast<float>(d + 1);
    }

    // Embeds eight pixels at once (one per lane), like densecrf's SSE build: features f[0..d)
    // in, and per lane the d+1 barycentric weights, the remainder-0 vertex (rem0) and the ranks
    // from which every enclosing vertex follows (vertex r: rem0[i] + r, less d+1 where rank[i] > d - r).
    void operator()(const vec8* f, vec8* weights, vec8* rem0, vec8* rank) const {
        vec8 elevated[kMaxFeatureDim + 1];
        vec8 sm = splat8(0.0f);
        for (int j = d; j > 0; --j) {
            const vec8 cf = f[j - 1] * splat8(scale[j - 1]);
            elevated[j] = sm - splat8(static_cast<float>(j)) * cf;
            sm += cf;
        }
        elevated[0] = sm;

        // round half to even, as SSE rounds: adding 1.5·2^23 leaves no fraction bits
        const vec8 shifter = splat8(12582912.0f);
        vec8 sum = splat8(0.0f);
        for (int i = 0; i <= d; ++i) {
            const vec8 v = (splat8(inv_dp1) * elevated[i] + shifter) - shifter;
            rem0[i] = v * splat8(dp1);
            sum += v;
            rank[i] = splat8(0.0f);
        }
        const vec8 one = splat8(1.0f), zero = splat8(0.0f);
        for (int i = 0; i < d; ++i) {
            const vec8 di = elevated[i] - rem0[i];
            for (int j = i + 1; j <= d; ++j) {
                const ivec8 less = di < elevated[j] - rem0[j];  // strict: ties rank the later index higher
                rank[i] += less ? one : zero;
                rank[j] += less ? zero : one;
            }
        }
        const vec8 wrap = splat8(dp1);
        for (int i = 0; i <= d; ++i) {
            rank[i] += sum;
            const vec8 fix = (rank[i] < zero ? wrap : zero) - (rank[i] >= wrap ? wrap : zero);
            rank[i] += fix;
            rem0[i] += fix;
        }

        // bary[p] = v_a - v_b with rank(a) = d - p and rank(b) = d - p + 1; selecting with masks
        // gives exactly the bits of densecrf's scatter (adding zeros is exact)
        vec8 v[kMaxFeatureDim + 1];
        for (int i = 0; i <= d; ++i) v[i] = (elevated[i] - rem0[i]) * splat8(inv_dp1);
        vec8 last = zero;  // bary[d + 1]
        for (int p = 0; p <= d + 1; ++p) {
            vec8 plus = zero, minus = zero;
            for (int i = 0; i <= d; ++i) {
                plus += rank[i] == splat8(static_cast<float>(d - p)) ? v[i] : zero;
                minus += rank[i] == splat8(static_cast<float>(d - p + 1)) ? v[i] : zero;
            }
            if (p <= d)
                weights[p] = plus - minus;
            else
                last = plus - minus;
        }
        weights[0] += one + last;
    }
};

// Features of the eight pixels first .. first+7 (lanes past the image repeat its last pixel).
void pixel_features8(const FeatureSpec& spec, int64_t first, vec8* f) {
    const int64_t n = spec.pixels();
    int64_t x = first % spec.width, y = first / spec.width;  // one division per eight pixels
    for (int lane = 0; lane < 8; ++lane) {
        const int64_t pixel = std::min(first + lane, n - 1);
        f[0][lane] = static_cast<float>(x);
        f[1][lane] = static_cast<float>(y);
        for (int64_t c = 0; c < spec.channels; ++c) f[2 + c][lane] = spec.image[c * n + pixel];
        if (first + lane + 1 < n && ++x == spec.width) {  // past the image: stay on the last pixel
            x = 0;
            ++y;
        }
    }
    f[0] = f[0] / splat8(spec.theta_xy);
    f[1] = f[1] / splat8(spec.theta_xy);
    for (int64_t c = 0; c < spec.channels; ++c) f[2 + c] = f[2 + c] / splat8(spec.theta_color);
}

// The barycentric weights of pixels p0 .. p0+7 (weights[i]: weight i, a lane per pixel) pixel-major into
// `weight`, and times alpha into `slice_weight`, for the pixels below the chunk's `end`. Transposed, then
// each pixel's d+1 written with one 8-wide store whose tail the following pixels overwrite; a store that
// would reach past the chunk's entries (into another thread's, or past the array) is written exactly instead.
void store_weights(const vec8* weights, int d, int64_t p0, int64_t end, float alpha, float* weight,
                   float* slice_weight) {
    const int lanes = static_cast<int>(std::min<int64_t>(8, end - p0));
    if (d + 1 <= 8) {
        vec8 rows[8], pixel[8];
        for (int i = 0; i < 8; ++i) rows[i] = i <= d ? weights[i] : splat8(0.0f);
        transpose8(rows, pixel);
        for (int lane = 0; lane < lanes; ++lane) {
            const int64_t e = (p0 + lane) * (d + 1);
            if (e + 8 <= end * (d + 1)) {
                store8(weight + e, pixel[lane]);
                store8(slice_weight + e, pixel[lane] * splat8(alpha));
            } else {
                for (int i = 0; i <= d; ++i) {
                    weight[e + i] = pixel[lane][i];
                    slice_weight[e + i] = pixel[lane][i] * alpha;
                }
            }
        }
    } else {
        for (int lane = 0; lane < lanes; ++lane)
            for (int i = 0; i <= d; ++i) {
                weight[(p0 + lane) * (d + 1) + i] = weights[i][lane];
                slice_weight[(p0 + lane) * (d + 1) + i] = weights[i][lane] * alpha;
            }
    }
}

// Packs d coordinates into one integer: coordinate i is stored as c[i] - low[i], from bit shift[i] up to
// the next coordinate's shift (the last up to bit 62).
struct KeyPacking {
    int d = 0;
    int32_t low[kMaxFeatureDim];
    int32_t high[kMaxFeatureDim];
    int shift[kMaxFeatureDim];

    // the key step that adds 1 to every coordinate
    uint64_t ones() const {
        uint64_t sum = 0;
        for (int i = 0; i < d; ++i) sum += 1ull << shift[i];
        return sum;
    }
    uint64_t pack(const int32_t* c) const {
        uint64_t key = 0;
        for (int i = 0; i < d; ++i) key |= static_cast<uint64_t>(c[i] - low[i]) << shift[i];
        return key;
    }
    void unpack(uint64_t key, int32_t* c) const {
        for (int i = 0; i < d; ++i) {
            const int next = i + 1 < d ? shift[i + 1] : 64;
            const uint64_t mask = next - shift[i] >= 64 ? ~0ull : ((1ull << (next - shift[i])) - 1);
            c[i] = static_cast<int32_t>((key >> shift[i]) & mask) + low[i];
        }
    }
};

int64_t table_capacity_for(int64_t max_entries) {
    int64_t c = 1024;
    while (c < 2 * max_entries) c *= 2;
    return c;
}

// Open addressing with linear probing; a slot holds key and id together, so a probe is one cache line.
struct HashTable {
    HashSlot* slots;
    int64_t mask;
    int shift;  // 64 - log2(capacity)

    // Fibonacci hashing: the multiply carries every key bit into the top bits, which pick the slot
    int64_t home(uint64_t key) const { return static_cast<int64_t>((key * 0x9E3779B97F4A7C15ull) >> shift); }
    void prefetch(uint64_t key) const { __builtin_prefetch(slots + home(key)); }

    int32_t find(uint64_t key) const {
        for (int64_t s = home(key);; s = (s + 1) & mask) {
            if (slots[s].key == key) return slots[s].id;
            if (slots[s].key == kEmptySlot) return -1;
        }
    }
    // inserts with id `next` if absent; returns the key's id
    int32_t insert(uint64_t key, int32_t next) {
        for (int64_t s = home(key);; s = (s + 1) & mask) {
            if (slots[s].key == key) return slots[s].id;
            if (slots[s].key == kEmptySlot) {
                slots[s].key = key;
                slots[s].id = next;
                return next;
            }
        }
    }
    void clear(int64_t capacity) {
        mask = capacity - 1;
        shift = 64;
        for (int64_t c = capacity; c > 1; c >>= 1) --shift;
        for (int64_t s = 0; s < capacity; ++s) slots[s].key = kEmptySlot;
    }
};

// The keys of a vertex's 2(d+1) blur neighbours, the pair along axis j at probe[2j] and probe[2j + 1]
// (blur_neighbours, step 5 of Lattice::build), or kEmptySlot for a neighbour with a coordinate outside
// the packed range, which cannot exist. The slots of the others are prefetched.
void neighbour_keys(uint64_t packed, const KeyPacking& packing, uint64_t ones, const HashTable& table,
                    uint64_t* probe) {
    const int d = packing.d;
    int32_t key[kMaxFeatureDim];
    packing.unpack(packed, key);
    int at_low = 0, at_high = 0;  // coordinates that cannot step down / up by one
    for (int k = 0; k < d; ++k) {
        at_low += key[k] - 1 < packing.low[k];
        at_high += key[k] + 1 > packing.high[k];
    }
    for (int j = 0; j <= d; ++j) {
        bool ok1 = true, ok2 = true;
        uint64_t k1 = packed - ones, k2 = packed + ones;
        if (j < d) {
            const uint64_t step = static_cast<uint64_t>(d + 1) << packing.shift[j];
            k1 += step;
            k2 -= step;
            ok1 = at_low - (key[j] - 1 < packing.low[j]) == 0 && key[j] + d <= packing.high[j];
            ok2 = at_high - (key[j] + 1 > packing.high[j]) == 0 && key[j] - d >= packing.low[j];
        } else {
            ok1 = at_low == 0;
            ok2 = at_high == 0;
        }
        probe[2 * j] = ok1 ? k1 : kEmptySlot;
        probe[2 * j + 1] = ok2 ? k2 : kEmptySlot;
        if (ok1) table.prefetch(k1);
        if (ok2) table.prefetch(k2);
    }
}

}  // namespace

void LatticeScratch::plan(Workspace& ws, int64_t max_entries) {
    rem0 = ws.take<int32_t>(max_entries + 8 * (kMaxFeatureDim + 1));  // whole blocks of 8 pixels
    rank = ws.take<int32_t>(max_entries + 8 * (kMaxFeatureDim + 1));
    entry_key = ws.take<uint64_t>(max_entries);
    max_table = table_capacity_for(max_entries);
    table = ws.take<HashSlot>(max_table);
    cursor = ws.take<int32_t>(max_entries);
}

void Lattice::plan(Workspace& ws, const FeatureSpec& spec) {
    d_ = spec.dim();
    pixels_ = spec.pixels();
    const int64_t entries = pixels_ * (d_ + 1);
    entry_vertex_ = ws.take<int32_t>(entries);
    entry_weight_ = ws.take<float>(entries);
    entry_slice_weight_ = ws.take<float>(entries);
    csr_begin_ = ws.take<int32_t>(entries + 1);
    csr_pixel_ = ws.take<int32_t>(entries);
    csr_weight_ = ws.take<float>(entries);
    neighbours_ = ws.take<int32_t>(entries * (d_ + 1) * 2);
    vertex_key_ = ws.take<uint64_t>(entries);
    values_ = ws.take<float>((entries + 1) * kLabelTile);
    next_ = ws.take<float>((entries + 1) * kLabelTile);
}

namespace {

// The steps of Lattice::build, in order. Those that loop over the pixels or the vertices are kept out of
// line: inlined into build (GCC inlines a function called once), they share one register allocation in
// which the hash probes spill their key and mask, and the build ran 6% slower on one thread.

// What embed_pixels finds for key_packing: the range of every vertex coordinate over the image, and the
// largest |scaled feature|.
struct CoordinateRanges {
    int32_t low[kMaxFeatureDim];
    int32_t high[kMaxFeatureDim];
    float largest;
};

// Step 1 of Lattice::build. Embeds every pixel: its barycentric weights into `weight` and, times alpha,
// into `slice_weight` (pixel-major, d+1 per pixel), its remainder-0 vertex and ranks into scratch.rem0 and
// scratch.rank (block-major); and returns the range of every vertex coordinate (vertex r's coordinate i is
// rem0[i] + canonical[r][rank[i]], which spans rem0[i] - rank[i] .. rem0[i] + d - rank[i] over r), to
// choose the packing's bit widths, and the largest |scaled feature|, to refuse what keys cannot resolve.
[[gnu::noinline]]
CoordinateRanges embed_pixels(const FeatureSpec& spec, float alpha, int threads, LatticeScratch& scratch,
                              float* weight, float* slice_weight) {
    const int d = spec.dim();
    const int64_t n = spec.pixels();
    const Embedding embed(d);
    const int64_t chunks = (n + kPixelGrain - 1) / kPixelGrain;
    std::vector<int32_t> chunk_low(chunks * d, std::numeric_limits<int32_t>::max());
    std::vector<int32_t> chunk_high(chunks * d, std::numeric_limits<int32_t>::min());
    std::vector<float> chunk_largest(chunks, 0.0f);  // largest |scaled feature| (NaN-free: inputs are finite)
    parallel_for(n, kPixelGrain, threads, [&](int64_t begin, int64_t end) {
        vec8 f[kMaxFeatureDim], weights[kMaxFeatureDim + 1], rem0[kMaxFeatureDim + 1], rank[kMaxFeatureDim + 1];
        ivec8 lo[kMaxFeatureDim], hi[kMaxFeatureDim];
        for (int i = 0; i < d; ++i) {
            lo[i] = ivec8{} + std::numeric_limits<int32_t>::max();
            hi[i] = ivec8{} + std::numeric_limits<int32_t>::min();
        }
        vec8 largest = splat8(0.0f);
        for (int64_t p0 = begin; p0 < end; p0 += 8) {
            pixel_features8(spec, p0, f);  // lanes past the image repeat its last pixel
            for (int i = 0; i < d; ++i) {
                const vec8 c = f[i] * splat8(embed.scale[i]);
                largest = max8(largest, c > splat8(0.0f) ? c : -c);
            }
            embed(f, weights, rem0, rank);
            // remainder-0 points and ranks as they come, eight pixels per vector (block-major)
            int32_t* block_rem0 = scratch.rem0 + p0 * (d + 1);
            int32_t* block_rank = scratch.rank + p0 * (d + 1);
            // Clamped first: features too large for the lattice (refused after this pass, by `largest`)
            // would overflow int32 in the conversion and the coordinate ranges, which is undefined.
            // Accepted lattices have |coordinates| < 2^22 and ranks in 0..d: the clamp never acts.
            const vec8 bound = splat8(536870912.0f);  // 2^29: ri - ki and ri + d - ki stay in int32
            for (int i = 0; i <= d; ++i) {
                const ivec8 ri = __builtin_convertvector(max8(-bound, rem0[i] < bound ? rem0[i] : bound), ivec8);
                const ivec8 ki = __builtin_convertvector(max8(-bound, rank[i] < bound ? rank[i] : bound), ivec8);
                if (i < d) {
                    const ivec8 low = ri - ki, high = ri + d - ki;
                    lo[i] = low < lo[i] ? low : lo[i];
                    hi[i] = high > hi[i] ? high : hi[i];
                }
                std::memcpy(block_rem0 + 8 * i, &ri, sizeof(ri));
                std::memcpy(block_rank + 8 * i, &ki, sizeof(ki));
            }
            store_weights(weights, d, p0, end, alpha, weight, slice_weight);
        }
        chunk_largest[begin / kPixelGrain] = max8(largest);
        int32_t* chunk_lo = &chunk_low[(begin / kPixelGrain) * d];
        int32_t* chunk_hi = &chunk_high[(begin / kPixelGrain) * d];
        for (int i = 0; i < d; ++i)
            for (int lane = 0; lane < 8; ++lane) {
                chunk_lo[i] = std::min(chunk_lo[i], lo[i][lane]);
                chunk_hi[i] = std::max(chunk_hi[i], hi[i][lane]);
            }
    });
    CoordinateRanges ranges;
    for (int i = 0; i < d; ++i) {
        ranges.low[i] = std::numeric_limits<int32_t>::max();
        ranges.high[i] = std::numeric_limits<int32_t>::min();
        for (int64_t c = 0; c < chunks; ++c) {
            ranges.low[i] = std::min(ranges.low[i], chunk_low[c * d + i]);
            ranges.high[i] = std::max(ranges.high[i], chunk_high[c * d + i]);
        }
    }
    ranges.largest = *std::max_element(chunk_largest.begin(), chunk_largest.end());
    return ranges;
}

// The end of step 1 of Lattice::build. The packing of the coordinate ranges into 64-bit keys (into
// `packing`), each coordinate taking the bits its span needs. Returns false, with a message in error, if
// the scaled features are beyond what float lattice keys resolve or the coordinates need more than 63 bits.
bool key_packing(const FeatureSpec& spec, const CoordinateRanges& ranges, KeyPacking& packing, char* error,
                 int error_len) {
    const int d = spec.dim();
    // Elevated coordinates are sums of up to 2d scaled features and are rounded through float: past
    // 2^22 a float has no fraction bits left and the lattice would be meaningless.
    const float largest = ranges.largest;
    if (!(largest * static_cast<float>(2 * d) < 4194304.0f)) {
        std::snprintf(error, error_len,
                      "lattice coordinates out of range: scaled features reach %g, beyond what float lattice "
                      "keys resolve (2^22 / %d); %s is too small for a %lldx%lld image",
                      largest, 2 * d, KernelThetas(spec).text, static_cast<long long>(spec.height),
                      static_cast<long long>(spec.width));
        return false;
    }
    packing.d = d;
    int bits = 0;
    for (int i = 0; i < d; ++i) {
        packing.low[i] = ranges.low[i];
        packing.high[i] = ranges.high[i];
        const uint64_t span = static_cast<uint64_t>(static_cast<int64_t>(packing.high[i]) - packing.low[i]);
        int width = 1;
        while (width < 63 && (span >> width) != 0) ++width;
        packing.shift[i] = bits;
        bits += width;
    }
    if (bits > 63) {  // 63 keeps the all-ones empty-slot marker out of reach of any key
        // each of the d coordinates takes a few bits even on a flat image, so many colour channels run
        // out of key before the thetas do
        std::snprintf(error, error_len,
                      "lattice keys need %d bits but only 63 fit a 64-bit key: the features span too "
                      "wide a range (%s, for a %lldx%lld image with %lld colour channels); larger thetas or "
                      "fewer colour channels narrow it",
                      bits, KernelThetas(spec).text, static_cast<long long>(spec.height),
                      static_cast<long long>(spec.width), static_cast<long long>(spec.channels));
        return false;
    }
    return true;
}

// Step 2 of Lattice::build. The packed key of every (pixel, remainder) entry into scratch.entry_key, from
// the remainder-0 vertices and ranks embed_pixels left in scratch. canonical[r][j] = r - (d+1)·[j > d-r],
// so going from vertex r-1 to r adds 1 to every coordinate and takes d+1 from the one whose rank is
// d+1-r: a constant update of the packed key instead of repacking d coordinates.
[[gnu::noinline]]
void pack_entry_keys(const KeyPacking& packing, int64_t pixels, int threads, LatticeScratch& scratch) {
    const int d = packing.d;
    const uint64_t ones = packing.ones();
    parallel_for(pixels, kPixelGrain, threads, [&](int64_t begin, int64_t end) {
        int32_t c[kMaxFeatureDim];
        uint64_t drop[kMaxFeatureDim + 2];  // drop[rank]: what crossing that coordinate subtracts
        for (int64_t p = begin; p < end; ++p) {
            // block-major, as embed_pixels stored them: coordinate i of pixel p at 8·i + p mod 8 of its block
            const int32_t* rem0 = scratch.rem0 + (p - p % 8) * (d + 1) + p % 8;
            const int32_t* rank = scratch.rank + (p - p % 8) * (d + 1) + p % 8;
            for (int i = 0; i < d; ++i) c[i] = rem0[8 * i];
            drop[rank[8 * d]] = 0;  // the implied (d+1)-th coordinate is not in the key
            for (int i = 0; i < d; ++i) drop[rank[8 * i]] = static_cast<uint64_t>(d + 1) << packing.shift[i];
            uint64_t key = packing.pack(c);
            uint64_t* out = scratch.entry_key + p * (d + 1);
            out[0] = key;
            for (int r = 1; r <= d; ++r) {
                key += ones - drop[d + 1 - r];
                out[r] = key;
            }
        }
    });
}

// The lattice's vertices: the hash table from packed key to vertex id, and how many there are.
struct UniqueVertices {
    HashTable table;
    int32_t count;
};

// Step 3 of Lattice::build. Unique keys of scratch.entry_key with a hash table (in scratch.table) that
// starts small (the lattice is usually far below its worst case, and a small table stays in cache) and
// doubles when half full. Vertex ids are handed out in first-seen order: each entry's id into
// `entry_vertex`, each vertex's key into `vertex_key`.
[[gnu::noinline]]
UniqueVertices unique_vertices(LatticeScratch& scratch, int64_t pixels, int d, int32_t* entry_vertex,
                               uint64_t* vertex_key) {
    const int64_t entries = pixels * (d + 1);
    HashTable table{scratch.table, 0, 64};
    int64_t capacity = std::min<int64_t>(scratch.max_table, table_capacity_for(pixels / 2 + 1));
    table.clear(capacity);
    int32_t count = 0;
    constexpr int64_t kLookahead = 16;  // keys are known ahead: fetch their slots before they are needed
    for (int64_t e = 0; e < entries; ++e) {
        if (e + kLookahead < entries) table.prefetch(scratch.entry_key[e + kLookahead]);
        const uint64_t key = scratch.entry_key[e];
        const int32_t id = table.insert(key, count);
        if (id == count) {
            vertex_key[count++] = key;
            if (2 * static_cast<int64_t>(count) > capacity) {
                capacity *= 2;
                table.clear(capacity);
                for (int32_t v = 0; v < count; ++v) table.insert(vertex_key[v], v);
            }
        }
        entry_vertex[e] = id;
    }
    return {table, count};
}

// Step 4 of Lattice::build, for several threads. The splat matrix's transpose as CSR: each vertex's
// entries in pixel order (vertex v's at csr_begin[v] .. csr_begin[v+1]-1); `cursor` holds the fill positions.
[[gnu::noinline]]
void splat_csr(const int32_t* entry_vertex, const float* entry_weight, int64_t pixels, int d, int64_t vertices,
               int32_t* cursor, int32_t* csr_begin, int32_t* csr_pixel, float* csr_weight) {
    const int64_t entries = pixels * (d + 1);
    std::fill(csr_begin, csr_begin + vertices + 1, 0);
    for (int64_t e = 0; e < entries; ++e) ++csr_begin[entry_vertex[e] + 1];
    for (int64_t v = 0; v < vertices; ++v) csr_begin[v + 1] += csr_begin[v];
    std::copy(csr_begin, csr_begin + vertices, cursor);
    for (int64_t e = 0; e < entries; ++e) {
        const int32_t slot = cursor[entry_vertex[e]]++;
        csr_pixel[slot] = static_cast<int32_t>(e / (d + 1));
        csr_weight[slot] = entry_weight[e];
    }
}

// Step 5 of Lattice::build. Blur neighbours along each lattice axis j, into `neighbours` (d+1, vertices, 2):
// key -1 on every coordinate but j, which moves by +d (and the mirror image). For j = d the moved
// coordinate is the implied (d+1)-th one. In packed form that is key - ones + (d+1)·bit_j; a neighbour
// with a coordinate outside the packed range cannot exist. A missing neighbour is `vertices`, the zero row.
// The lookups are random accesses into a table far larger than the caches: the keys of a batch of
// vertices are computed and their slots prefetched first, so the misses overlap.
[[gnu::noinline]]
void blur_neighbours(const uint64_t* vertex_key, int64_t vertices, const KeyPacking& packing,
                     const HashTable& table, int threads, int32_t* neighbours) {
    const int d = packing.d;
    const uint64_t ones = packing.ones();
    const int32_t missing = static_cast<int32_t>(vertices);
    constexpr int64_t kBatch = 8;
    parallel_for(vertices, kVertexGrain, threads, [&](int64_t begin, int64_t end) {
        uint64_t probe[kBatch][2 * (kMaxFeatureDim + 1)];  // neighbour keys; kEmptySlot: cannot exist
        for (int64_t v0 = begin; v0 < end; v0 += kBatch) {
            const int64_t batch = std::min(kBatch, end - v0);
            for (int64_t b = 0; b < batch; ++b) neighbour_keys(vertex_key[v0 + b], packing, ones, table, probe[b]);
            for (int64_t b = 0; b < batch; ++b) {
                for (int j = 0; j <= d; ++j) {
                    const uint64_t k1 = probe[b][2 * j], k2 = probe[b][2 * j + 1];
                    const int32_t id1 = k1 != kEmptySlot ? table.find(k1) : -1;
                    const int32_t id2 = k2 != kEmptySlot ? table.find(k2) : -1;
                    int32_t* out = neighbours + (static_cast<int64_t>(j) * vertices + v0 + b) * 2;
                    out[0] = id1 < 0 ? missing : id1;
                    out[1] = id2 < 0 ? missing : id2;
                }
            }
        }
    });
}

}  // namespace

bool Lattice::build(const FeatureSpec& spec, LatticeScratch& scratch, int threads, char* error,
                    int error_len) {
    alpha_ = 1.0f / (1.0f + std::pow(2.0f, static_cast<float>(-d_)));
    const CoordinateRanges ranges =
        embed_pixels(spec, alpha_, threads, scratch, entry_weight_, entry_slice_weight_);
    KeyPacking packing;
    if (!key_packing(spec, ranges, packing, error, error_len)) return false;
    pack_entry_keys(packing, pixels_, threads, scratch);
    const UniqueVertices unique = unique_vertices(scratch, pixels_, d_, entry_vertex_, vertex_key_);
    vertices_ = unique.count;
    if (threads > 1)
        splat_csr(entry_vertex_, entry_weight_, pixels_, d_, vertices_, scratch.cursor, csr_begin_, csr_pixel_,
                  csr_weight_);
    blur_neighbours(vertex_key_, vertices_, packing, unique.table, threads, neighbours_);
    threads_ = threads;
    return true;
}

void Lattice::filter_ones(float* out) const {
    const int64_t m = vertices_;
    float* values = values_;
    float* next = next_;
    if (gathers()) {
        parallel_for(m, kVertexGrain, threads_, [&](int64_t begin, int64_t end) {
            for (int64_t v = begin; v < end; ++v) {
                float acc = 0.0f;
                for (int32_t s = csr_begin_[v]; s < csr_begin_[v + 1]; ++s) acc += csr_weight_[s];
                values[v] = acc;
            }
        });
    } else {
        std::fill(values, values + m, 0.0f);
        for (int64_t e = 0; e < pixels_ * (d_ + 1); ++e) values[entry_vertex_[e]] += entry_weight_[e];
    }
    values[m] = next[m] = 0.0f;
    for (int j = 0; j <= d_; ++j) {
        const int32_t* nb = neighbours_ + static_cast<int64_t>(j) * m * 2;
        parallel_for(m, kVertexGrain, threads_, [&](int64_t begin, int64_t end) {
            for (int64_t v = begin; v < end; ++v) next[v] = values[v] + 0.5f * (values[nb[2 * v]] + values[nb[2 * v + 1]]);
        });
        std::swap(values, next);
    }
    parallel_for(pixels_, kPixelGrain, threads_, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
            float acc = 0.0f;
            for (int r = 0; r <= d_; ++r)
                acc += entry_slice_weight_[p * (d_ + 1) + r] * values[entry_vertex_[p * (d_ + 1) + r]];
            out[p] = acc;
        }
    });
}

template <int V>
void Lattice::clear(bool spare) const {
    std::memset(spare ? next_ : values_, 0, vertices_ * 8 * V * sizeof(float));
}

template <int V>
void Lattice::gather(const float* in, int64_t stride, int64_t c0, const float* pre) const {
    parallel_for(vertices_, kVertexGrain, threads_, [&](int64_t begin, int64_t end) {
        for (int64_t v = begin; v < end; ++v) {
            vec8 acc[V] = {};
            for (int32_t s = csr_begin_[v]; s < csr_begin_[v + 1]; ++s) {
                const int64_t p = csr_pixel_[s];
                const vec8 w = splat8(csr_weight_[s]);
                const float* x = in + p * stride + c0;
                if (pre) {
                    const vec8 f = splat8(pre[p]);
                    for (int k = 0; k < V; ++k) acc[k] += w * (load8(x + 8 * k) * f);
                } else {
                    for (int k = 0; k < V; ++k) acc[k] += w * load8(x + 8 * k);
                }
            }
            for (int k = 0; k < V; ++k) store8(values_ + v * 8 * V + 8 * k, acc[k]);
        }
    });
}

// One pass per lattice axis, double-buffered; missing neighbours read the zero row M.
template <int V>
void Lattice::blur(bool transpose) const {
    constexpr int kWidth = 8 * V;
    const int64_t m = vertices_;
    std::memset(values_ + m * kWidth, 0, kWidth * sizeof(float));
    std::memset(next_ + m * kWidth, 0, kWidth * sizeof(float));
    for (int step = 0; step <= d_; ++step) {
        const int j = transpose ? d_ - step : step;
        const int32_t* nb = neighbours_ + static_cast<int64_t>(j) * m * 2;
        const float* values = values_;
        float* next = next_;
        parallel_for(m, kVertexGrain, threads_, [&](int64_t begin, int64_t end) {
            const vec8 half = splat8(0.5f);
            for (int64_t v = begin; v < end; ++v) {
                const float* self = values + v * kWidth;
                const float* a = values + static_cast<int64_t>(nb[2 * v]) * kWidth;
                const float* b = values + static_cast<int64_t>(nb[2 * v + 1]) * kWidth;
                for (int k = 0; k < V; ++k)
                    store8(next + v * kWidth + 8 * k, load8(self + 8 * k) + half * (load8(a + 8 * k) + load8(b + 8 * k)));
            }
        });
        std::swap(values_, next_);
    }
}

template <int V>
void Lattice::filter_tile(const float* in, int64_t stride, int64_t c0, const float* pre, bool transpose,
                          const FilterOutput& output) const {
    if (gathers()) {
        gather<V>(in, stride, c0, pre);
    } else {
        clear<V>();
        for (int64_t p = 0; p < pixels_; ++p) {
            vec8 x[V];
            for (int k = 0; k < V; ++k) x[k] = load8(in + p * stride + c0 + 8 * k);
            if (pre)
                for (int k = 0; k < V; ++k) x[k] = x[k] * splat8(pre[p]);
            scatter<V>(p, x);
        }
    }
    blur<V>(transpose);
    parallel_for(pixels_, kPixelGrain, threads_, [&](int64_t begin, int64_t end) {
        const vec8 w = splat8(output.weight);
        for (int64_t p = begin; p < end; ++p) {
            vec8 t[V];
            slice<V>(p, t);
            if (output.scale)
                for (int k = 0; k < V; ++k) t[k] = t[k] * splat8(output.scale[p]);
            float* o = output.out + p * stride + c0;
            for (int k = 0; k < V; ++k) {
                switch (output.mode) {
                    case FilterOutput::kStore: store8(o + 8 * k, t[k]); break;
                    case FilterOutput::kAccumulate: store8(o + 8 * k, load8(o + 8 * k) + w * t[k]); break;
                    case FilterOutput::kFromBase:
                        store8(o + 8 * k, load8(output.base + p * stride + c0 + 8 * k) + w * t[k]);
                        break;
                }
            }
        }
    });
}

void Lattice::filter(const float* in, int64_t stride, const float* pre, bool transpose,
                     const FilterOutput& output) const {
    for (int64_t c0 = 0; c0 < stride; c0 += kLabelTile) {
        switch (std::min<int64_t>(kLabelTile, stride - c0) / 8) {
            case 1: filter_tile<1>(in, stride, c0, pre, transpose, output); break;
            case 2: filter_tile<2>(in, stride, c0, pre, transpose, output); break;
            case 3: filter_tile<3>(in, stride, c0, pre, transpose, output); break;
            default: filter_tile<4>(in, stride, c0, pre, transpose, output); break;
        }
    }
}

#define DYNSEG_INSTANTIATE(V)                                                                      \
    template void Lattice::clear<V>(bool) const;                                                       \
    template void Lattice::gather<V>(const float*, int64_t, int64_t, const float*) const;          \
    template void Lattice::blur<V>(bool) const;
DYNSEG_INSTANTIATE(1)
DYNSEG_INSTANTIATE(2)
DYNSEG_INSTANTIATE(3)
DYNSEG_INSTANTIATE(4)
#undef DYNSEG_INSTANTIATE

}  // namespace dynseg
