// lattice.cuh: the permutohedral lattice on the GPU, the same lattice as plugins/src/lattice.cpp.
//
// Build: embed every pixel (densecrf's float operations, so the vertices match the CPU's), pack each
// (pixel, remainder) entry's vertex into a 64-bit key and insert it into a hash table that keeps each
// key's first entry, number the vertices in the order of their first entries (so vertex ids are
// deterministic, whatever the table's slots), radix-sort the entries by vertex id (stable, so each
// vertex keeps its entries in pixel order), and find each vertex's blur neighbours in the table. The
// sorted entries are the CSR of the splat matrix's transpose: splatting is a gather in a fixed order
// (chunks of a vertex's entries, then the chunks in order), so results are bitwise reproducible
// without atomics.
// The vertex count stays on the device; kernels over vertices loop over it grid-stride.
#pragma once

#include <cstdint>

#include "../workspace.h"
#include "common.cuh"
#include "dynseg_crf.h"

namespace dynseg {
namespace cuda {

// How d lattice coordinates pack into a 64-bit key (computed on the device from the coordinate ranges).
struct Packing {
    int32_t low[kMaxFeatureDim];
    int32_t high[kMaxFeatureDim];
    int32_t shift[kMaxFeatureDim];
    uint64_t ones;  // +1 on every coordinate, packed
    int32_t ok;     // 0 if the lattice cannot be built (Status says why)
};

// Scratch of the builds, shared by every lattice of a call.
struct BuildScratch {
    int32_t* rem0 = nullptr;         // (N, d+1) remainder-0 vertex coordinates
    int32_t* rank = nullptr;         // (N, d+1)
    float* weight = nullptr;         // (E) barycentric weight of each entry
    uint64_t* table = nullptr;       // (slots) the vertex keys' hash table (lattice.cu)
    int32_t* first_entry = nullptr;  // (slots) the smallest entry index of each slot's key
    int32_t* entry_slot = nullptr;   // (E) the slot of each entry's key
    int32_t* entries = nullptr;      // (E) entry indices
    int32_t* numbered = nullptr;     // (E) inclusive scan of the first-entry flags: vertex id + 1 there
    int32_t* sorted_vertex = nullptr;   // (E) entries sorted by vertex: their vertices
    int32_t* sorted_entries = nullptr;  // and their entry indices
    uint64_t* vertex_key = nullptr;  // (M) each vertex's key
    int32_t* range = nullptr;        // -low[15], high[15], largest |scaled feature| (float bits)
    void* cub = nullptr;
    size_t cub_bytes = 0;

    void plan(Workspace& ws, int64_t max_entries);
};

// Where a filter's sliced value t goes, per pixel p and channel c (t scaled by scale[p] when scale is
// set): out = t | out += weight · t | out = base + weight · t. weight is a device scalar.
struct FilterOutput {
    enum Mode { kStore, kAccumulate, kFromBase };
    Mode mode = kStore;
    float* out = nullptr;  // pixel-major, same row stride as the input
    const float* scale = nullptr;
    const float* base = nullptr;
    const float* weight = nullptr;
};

// A lattice's device arrays, and the counts that live on the device: what the build fills and the
// filtering kernels read (they write only partial and values).
struct LatticeView {
    int d;
    int64_t entries;
    int32_t* vertices;      // M
    int32_t* entry_vertex;  // (N, d+1)
    float* slice_weight;    // (N, d+1) barycentric weight · alpha
    int32_t* csr_begin;     // (M+1)
    int32_t* csr_pixel;     // (E) in vertex order, pixel order within a vertex
    float* csr_weight;
    int32_t* neighbours;    // (d+1, E, 2); a missing neighbour is the zero row M
    // the splat's chunks: whole runs of kChunk entries of one vertex (lattice.cu)
    int32_t* chunks;        // their number
    int32_t* chunk_end;     // (M) inclusive scan of the chunks per vertex
    int32_t* chunk_first;   // first sorted entry of each chunk
    float* partial;         // (chunks, value width) chunk sums of the label tile in flight
    float* values[2];       // (M+1, value width) each: the splat, then the blur between the two
};

class Lattice {
public:
    // Lays out the lattice's arrays; its value buffers hold value_width channels per vertex (a multiple
    // of 4: the label tile that one filter pass carries).
    void plan(Workspace& ws, const FeatureSpec& spec, int64_t value_width);
    // Enqueues the build; a failure is recorded in status (first failure wins) and leaves a lattice
    // that is safe to filter with (its results are then discarded).
    void build(const FeatureSpec& spec, BuildScratch& scratch, int kernel, Status* status, const Launch& launch);
    const LatticeView& view() const { return view_; }
    int64_t value_width() const { return value_width_; }

private:
    LatticeView view_{};
    int64_t pixels_ = 0, value_width_ = 0;
    int slot_bits_ = 0;  // log2 of its hash table's slots
    Packing* packing_ = nullptr;
};

// Filtering through several lattices at once (the kernels of one CRF): each launch serves all of
// them, so a call makes a kernel's launches once rather than once per lattice. count is 1 to
// DYNSEG_MAX_KERNELS; the lattices must share a value width.

// The normalisation of lattice k's kernel per pixel into row k of n (count, N): 1/K(1), or
// 1/sqrt(K(1)) when symmetric.
void normalisers(const Lattice* lattices, int count, float* n, bool symmetric, const Launch& launch);

// K_k(pre_k ⊙ in) (K_k^T when transpose) of every column of `in`, pixel-major (N, stride), stride a
// multiple of 4, written as outputs[k] says; pre is (count, N) or null. With more than one lattice
// the messages add up in lattice order into one array: outputs[k > 0] must accumulate into
// outputs[0].out.
void filter(const Lattice* lattices, int count, const float* in, int64_t stride, const float* pre, bool transpose,
            const FilterOutput* outputs, const Launch& launch);

}  // namespace cuda
}  // namespace dynseg
