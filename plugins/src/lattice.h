// lattice.h: the permutohedral lattice (Adams, Baek & Davis 2010) as densecrf builds it.
//
// A lattice is built once per image and kernel from the pixels' features and then filters any number
// of value channels: splat (on several threads a gather over the CSR of the splat matrix), blur along
// the d+1 lattice axes, slice. Vertex ids are whatever the hash table hands out; results do not
// depend on them, because every sum runs in pixel order, so filtering is bitwise deterministic for
// any thread count.
#pragma once

#include <cstdint>
#include <utility>

#include "kernel_features.h"
#include "simd.h"
#include "workspace.h"

namespace dynseg {

// Rows of pixel-major arrays are padded to whole vectors of 8 floats; the padding stays zero.
inline int64_t padded_to_vec8(int64_t channels) { return (channels + 7) / 8 * 8; }

struct HashSlot {
    uint64_t key;
    int32_t id;
};

// Scratch shared by every lattice build of one problem; not kept between calls.
struct LatticeScratch {
    int32_t* rem0 = nullptr;          // remainder-0 vertex coordinates, in blocks of 8 pixels ((d+1, 8) each)
    int32_t* rank = nullptr;          // rank of each coordinate, same layout
    uint64_t* entry_key = nullptr;    // (N·(d+1)) packed vertex keys
    HashSlot* table = nullptr;        // open-addressing hash table, up to max_table slots
    int64_t max_table = 0;
    int32_t* cursor = nullptr;        // (max vertices) CSR fill positions

    void plan(Workspace& ws, int64_t max_entries);
};

// Where a filter's sliced value v goes, per pixel p and channel c (t = v · scale[p], or v when
// scale is null). The float operations keep densecrf's order: normalise, weight, then add.
struct FilterOutput {
    enum Mode { kStore, kAccumulate, kFromBase };
    Mode mode = kStore;    // out = t | out += weight · t | out = base + weight · t
    float* out = nullptr;  // pixel-major, same row stride as the input
    const float* scale = nullptr;
    const float* base = nullptr;
    float weight = 1.0f;
};

// A lattice filters values in tiles of V vectors (8·V channels) per vertex: splat, then blur, then
// slice. The steps are public so that the mean field can fuse its own work around them.
class Lattice {
public:
    // Reserves the lattice's arrays for its worst case, (d+1)·N vertices, and its two value buffers.
    void plan(Workspace& ws, const FeatureSpec& spec);

    // Builds the lattice into the planned arrays. Returns false, with a message in error, if the
    // scaled features are beyond what float lattice keys resolve or the coordinates cannot be packed
    // into 64-bit keys.
    bool build(const FeatureSpec& spec, LatticeScratch& scratch, int threads, char* error,
               int error_len);

    // Filters every column of `in`, pixel-major (N, stride), stride a multiple of 8:
    // K(pre ⊙ in), or K^T(pre ⊙ in) when transpose (blur axes in reverse order, d..0), written as
    // `output` says. pre is a per-pixel factor or null. output.out may alias in.
    void filter(const float* in, int64_t stride, const float* pre, bool transpose,
                const FilterOutput& output) const;

    // n = K(1) per pixel: the lane-0 arithmetic of filter() over a column of ones, one float wide.
    void filter_ones(float* out) const;

    // Splat, step by step. Every vertex sums weight × value over its entries in pixel order,
    // either by scattering pixel after pixel (one thread: reads the input once, in order) or by
    // gathering each vertex's entries through the CSR (several threads). Both add in the same
    // order, so they give the same bits.
    bool gathers() const { return threads_ > 1; }
    // Scattering goes into the value rows, or into the spare buffer (`spare`) while the value rows
    // still hold blurred values being sliced; flip() then swaps the two.
    template <int V>
    void clear(bool spare = false) const;  // before scattering
    template <int V>
    void scatter(int64_t p, const vec8* x, bool spare = false) const {
        switch (d_ + 1) {  // unrolled for the usual lattices: spatial (d = 2) and RGB bilateral (d = 5)
            case 3: scatter_d<V, 3>(p, x, spare ? next_ : values_); break;
            case 6: scatter_d<V, 6>(p, x, spare ? next_ : values_); break;
            default: scatter_d<V, 0>(p, x, spare ? next_ : values_); break;
        }
    }
    template <int V>
    void gather(const float* in, int64_t stride, int64_t c0, const float* pre) const;

    template <int V>
    void blur(bool transpose) const;

    // The sliced value of pixel p: its d+1 vertices, weighted (weights pre-scaled by alpha, as densecrf)
    template <int V>
    void slice(int64_t p, vec8* out) const {
        switch (d_ + 1) {
            case 3: slice_d<V, 3>(p, out); break;
            case 6: slice_d<V, 6>(p, out); break;
            default: slice_d<V, 0>(p, out); break;
        }
    }

    void flip() const { std::swap(values_, next_); }


private:
    // D = d + 1 when known at compile time, 0 otherwise
    template <int V, int D>
    void scatter_d(int64_t p, const vec8* x, float* target) const {
        const int n = D > 0 ? D : d_ + 1;
        const int32_t* vertex = entry_vertex_ + p * n;
        const float* weight = entry_weight_ + p * n;
        for (int r = 0; r < n; ++r) {
            const vec8 w = splat8(weight[r]);
            float* o = target + static_cast<int64_t>(vertex[r]) * 8 * V;
            for (int k = 0; k < V; ++k) store8(o + 8 * k, load8(o + 8 * k) + w * x[k]);
        }
    }
    template <int V, int D>
    void slice_d(int64_t p, vec8* out) const {
        const int n = D > 0 ? D : d_ + 1;
        const int32_t* vertex = entry_vertex_ + p * n;
        const float* weight = entry_slice_weight_ + p * n;
        for (int k = 0; k < V; ++k) out[k] = splat8(0.0f);
        for (int r = 0; r < n; ++r) {
            const vec8 w = splat8(weight[r]);
            const float* x = values_ + static_cast<int64_t>(vertex[r]) * 8 * V;
            for (int k = 0; k < V; ++k) out[k] += w * load8(x + 8 * k);
        }
    }

    template <int V>
    void filter_tile(const float* in, int64_t stride, int64_t c0, const float* pre, bool transpose,
                     const FilterOutput& output) const;

    int d_ = 0;
    int threads_ = 1;
    int64_t pixels_ = 0;
    int64_t vertices_ = 0;
    float alpha_ = 0.0f;

    // per (pixel, remainder) entry, pixel-major: the enclosing simplex's vertices and weights
    int32_t* entry_vertex_ = nullptr;
    float* entry_weight_ = nullptr;
    float* entry_slice_weight_ = nullptr;  // weight · alpha, densecrf's slicing weight
    // CSR of the splat matrix (built for several threads only): vertex v gathers entries
    // csr_begin_[v] .. csr_begin_[v+1]-1, in pixel order
    int32_t* csr_begin_ = nullptr;
    int32_t* csr_pixel_ = nullptr;
    float* csr_weight_ = nullptr;
    // blur neighbours, (d+1, M, 2); a missing neighbour is the zero row M
    int32_t* neighbours_ = nullptr;
    uint64_t* vertex_key_ = nullptr;
    // (M+1, 8·V) value rows of the tile in flight and the blur's double buffer; the blur swaps
    // them (hence mutable: filtering does not change the lattice)
    mutable float* values_ = nullptr;
    mutable float* next_ = nullptr;
};

}  // namespace dynseg
