// meanfield.cpp: the CRF-as-RNN mean-field update, forward (docs/crf.md derives it; the backward pass
// is meanfield_backward.cpp).
//
// Per iteration:  F_k = Knorm_k(Q);  L = U - mu . sum_k W_k F_k [+ the detection potential's term];  Q = softmax(L).
// Potts (mu = -I) adds the messages to the unary in kernel order, which is densecrf's order of float
// operations.
#include "meanfield.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "boundary.h"
#include "parallel.h"
#include "simd.h"

namespace dynseg {
namespace {

constexpr int64_t kMaxReduceChunks = 64;

// The unnormalised softmax of one row of V vectors (exp(x - max x)), returning its sum; lanes past
// the labels in the last vector are padding and get 0.
template <int V>
inline float exp_row(const float* x, float* y, int64_t vectors, ivec8 in_use) {
    const int64_t n = V > 0 ? V : vectors;
    const vec8 lowest = splat8(-std::numeric_limits<float>::infinity());
    vec8 top = lowest;
    for (int64_t k = 0; k < n; ++k) {
        vec8 v = load8(x + 8 * k);
        if (k == n - 1) v = in_use ? v : lowest;
        top = max8(top, v);
    }
    const vec8 shift = splat8(max8(top));
    vec8 sum = splat8(0.0f);
    for (int64_t k = 0; k < n; ++k) {
        vec8 e = exp_nonpositive(load8(x + 8 * k) - shift);
        if (k == n - 1) e = in_use ? e : splat8(0.0f);
        store8(y + 8 * k, e);
        sum += e;
    }
    return sum8(sum);
}

template <int V>
inline void scale_row(float* y, int64_t vectors, float factor) {
    const int64_t n = V > 0 ? V : vectors;
    for (int64_t k = 0; k < n; ++k) store8(y + 8 * k, load8(y + 8 * k) * splat8(factor));
}

template <int V>
inline void softmax_row(const float* x, float* y, int64_t vectors, ivec8 in_use) {
    scale_row<V>(y, vectors, 1.0f / exp_row<V>(x, y, vectors, in_use));
}

constexpr int64_t kBlock = 16;      // pixels whose softmaxes run side by side
constexpr int64_t kCopyBlock = 64;  // pixels per load/store block: the block's rows stay in L1 while filled

// Softmax of `count` rows; the block's divisions go as vectors of reciprocals, off the rows' chains.
template <int V>
inline void block_softmax(const float (*rows)[8 * V], float (*q)[8 * V], int64_t count, ivec8 in_use) {
    alignas(32) float inverse[kBlock];
    for (int64_t b = 0; b < count; ++b) inverse[b] = exp_row<V>(rows[b], q[b], V, in_use);
    for (int64_t b = count; b < kBlock; ++b) inverse[b] = 1.0f;
    for (int64_t b = 0; b < kBlock; b += 8) store8(inverse + b, splat8(1.0f) / load8(inverse + b));
    for (int64_t b = 0; b < count; ++b) scale_row<V>(q[b], V, inverse[b]);
}

// a += sum_k w_k (norm_k ⊙ slice_k) at pixel p, kernel by kernel, from the lattices' blurred values.
// scalar_messages and stream_iterations both sum through here, so their float operations, and hence
// their bits, are the same by construction.
template <int V>
inline void add_scalar_messages(const Lattice* lattices, const float* const* norm, const dynseg_kernel* kernels,
                                int K, int64_t p, vec8* a) {
    vec8 t[V];
    for (int k = 0; k < K; ++k) {
        lattices[k].slice<V>(p, t);
        const vec8 n = splat8(norm[k][p]), w = splat8(kernels[k].weight[0]);
        for (int j = 0; j < V; ++j) a[j] += w * (t[j] * n);
    }
}

}  // namespace

// The workspace, in take() order (docs/crf.md section 5 sizes it):
//  1. the detection potential's box spans, terms and beliefs (and, backward, its history and gradients;
//     a member initialiser: first);
//  2. per kernel k: its lattice (Lattice::plan) and its normalisation norm_[k], N;
//  3. the builds' scratch, shared by the kernels (LatticeScratch::plan);
//  4. unary_, q_, filtered_, logits_, N x stride each;
//  5. backward only: history_ (T x N x stride), grad_logits_, grad_q_, grad_unary_, grad_message_, partial_.
MeanField::MeanField(const dynseg_crf_problem& problem, int pass, Workspace& ws)
    : problem_(problem), detections_(problem, pass, ws) {
    labels_ = problem.num_labels;
    stride_ = padded_to_vec8(labels_);
    pixels_ = problem.height * problem.width;
    threads_ = problem.threads > 0 ? problem.threads : hardware_threads();
    int max_dim = 2;
    for (int k = 0; k < problem.num_kernels; ++k) {
        const FeatureSpec& s = specs_[k] = feature_spec(problem, k);
        lattices_[k].plan(ws, s);
        norm_[k] = ws.take<float>(pixels_);
        max_dim = std::max(max_dim, s.dim());
    }
    scratch_.plan(ws, pixels_ * (max_dim + 1));

    const int64_t size = pixels_ * stride_;
    unary_ = ws.take<float>(size);
    q_ = ws.take<float>(size);
    filtered_ = ws.take<float>(size);
    logits_ = ws.take<float>(size);
    if (pass == DYNSEG_PASS_BACKWARD) {
        history_ = ws.take<float>(size * problem.iterations);
        grad_logits_ = ws.take<float>(size);
        grad_q_ = ws.take<float>(size);
        grad_unary_ = ws.take<float>(size);
        grad_message_ = ws.take<float>(size);
        reduce_chunk_ = std::max<int64_t>(kGrain, (pixels_ + kMaxReduceChunks - 1) / kMaxReduceChunks);
        const int64_t chunks = (pixels_ + reduce_chunk_ - 1) / reduce_chunk_;
        // the parameter sums P: L x L where a matrix weight or a full compatibility reads them, else only
        // their diagonal (memory: L can be 65536)
        bool full = problem.compat_kind == DYNSEG_COMPAT_FULL;
        for (int k = 0; k < problem.num_kernels; ++k) full = full || is_matrix(problem.kernels[k]);
        partial_ = ws.take<double>(chunks * (full ? labels_ * labels_ : labels_));
    }
}

bool MeanField::prepare(char* error, int error_len) {
    for (int k = 0; k < problem_.num_kernels; ++k) {
        if (!lattices_[k].build(specs_[k], scratch_, threads_, error, error_len)) return false;
        // n = K(1), then the normalisation factors computed in double and stored as float (densecrf)
        float* norm = norm_[k];
        lattices_[k].filter_ones(norm);
        const bool symmetric = problem_.normalization == DYNSEG_NORMALIZE_SYMMETRIC;
        parallel_for(pixels_, kGrain, threads_, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
                const double n = static_cast<double>(norm[i]) + 1e-20;
                norm[i] = static_cast<float>(symmetric ? 1.0 / std::sqrt(n) : 1.0 / n);
            }
        });
    }
    return true;
}

// (channels, N) planar -> (N, stride) pixel-major with zero padding, and back.
void MeanField::to_pixel_major(const float* planar, float* pixel_major, int64_t channels) const {
    const int64_t S = padded_to_vec8(channels);
    parallel_for(pixels_, kGrain, threads_, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; b += kCopyBlock) {
            const int64_t e = std::min(end, b + kCopyBlock);
            for (int64_t i = b; i < e; ++i)
                for (int64_t l = channels; l < S; ++l) pixel_major[i * S + l] = 0.0f;
            for (int64_t l = 0; l < channels; ++l)
                for (int64_t i = b; i < e; ++i) pixel_major[i * S + l] = planar[l * pixels_ + i];
        }
    });
}
// With softmax, each block's rows go through the softmax (into q_, still in cache) on the way out.
void MeanField::to_planar(const float* pixel_major, float* planar, int64_t channels, bool apply_softmax) const {
    const int64_t S = padded_to_vec8(channels);
    parallel_for(pixels_, kGrain, threads_, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; b += kCopyBlock) {
            const int64_t e = std::min(end, b + kCopyBlock);
            const float* rows = pixel_major;
            if (apply_softmax) {
                softmax_range(pixel_major, q_, b, e, 1);
                rows = q_;
            }
            for (int64_t l = 0; l < channels; ++l)
                for (int64_t i = b; i < e; ++i) planar[l * pixels_ + i] = rows[i * S + l];
        }
    });
}

// Messages with scalar kernel weights from Q, one label tile [c0, c0 + 8V) at a time, fused around
// the lattices: every pixel's Q row feeds all kernels' splats, then one pass slices every kernel and
// adds its weighted, normalised message to the logits: L = U + sum_k w_k Knorm_k(Q) for Potts
// (densecrf's order of operations), m = sum_k w_k Knorm_k(Q) otherwise. "after": Knorm = D K;
// "symmetric": D^1/2 K D^1/2 (the stored factor is already n^-1/2).
template <int V>
void MeanField::scalar_messages(int64_t c0, const float* q) {
    const int K = problem_.num_kernels;
    const int64_t S = stride_;
    const bool symmetric = problem_.normalization == DYNSEG_NORMALIZE_SYMMETRIC;
    // every lattice was built with threads_ (prepare), so lattice 0 answers for all of them
    if (lattices_[0].gathers()) {
        for (int k = 0; k < K; ++k) lattices_[k].gather<V>(q, S, c0, symmetric ? norm_[k] : nullptr);
    } else {
        for (int k = 0; k < K; ++k) lattices_[k].clear<V>();
        for (int64_t p = 0; p < pixels_; ++p) {
            vec8 x[V], xk[V];
            for (int j = 0; j < V; ++j) x[j] = load8(q + p * S + c0 + 8 * j);
            for (int k = 0; k < K; ++k) {
                for (int j = 0; j < V; ++j) xk[j] = symmetric ? x[j] * splat8(norm_[k][p]) : x[j];
                lattices_[k].scatter<V>(p, xk);
            }
        }
    }
    for (int k = 0; k < K; ++k) lattices_[k].blur<V>(false);
    const bool potts = problem_.compat_kind == DYNSEG_COMPAT_POTTS;
    parallel_for(pixels_, kGrain, threads_, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
            vec8 a[V];
            for (int j = 0; j < V; ++j) a[j] = potts ? load8(unary_ + p * S + c0 + 8 * j) : splat8(0.0f);
            add_scalar_messages<V>(lattices_, norm_, problem_.kernels, K, p, a);
            for (int j = 0; j < V; ++j) store8(logits_ + p * S + c0 + 8 * j, a[j]);
        }
    });
}

// logits_ (+)= W_k Knorm_k(Q) for one kernel, the general path (a matrix weight mixes labels, so the
// whole filtered row, in filtered_, is needed before the message of any label). The first kernel of a
// Potts problem starts the sum from U (`first`); the others add to what is there.
void MeanField::kernel_message(int k, const float* q, bool first) {
    const dynseg_kernel& kernel = problem_.kernels[k];
    const bool potts = problem_.compat_kind == DYNSEG_COMPAT_POTTS;
    const float* pre = problem_.normalization == DYNSEG_NORMALIZE_SYMMETRIC ? norm_[k] : nullptr;
    FilterOutput out;
    out.scale = norm_[k];
    if (!is_matrix(kernel)) {
        // non-Potts accumulators start at 0 (run_iterations clears them), Potts ones at U
        out.mode = potts && first ? FilterOutput::kFromBase : FilterOutput::kAccumulate;
        out.out = logits_;
        out.base = unary_;
        out.weight = kernel.weight[0];
        lattices_[k].filter(q, stride_, pre, false, out);
        return;
    }
    out.out = filtered_;
    lattices_[k].filter(q, stride_, pre, false, out);
    const int64_t L = labels_, S = stride_;
    // W's columns as padded rows (column c at c·S, zero past L), so one pixel's L sums run as vectors
    // of 8 rows: lane r adds W[r][c]·f[c] over c in the scalar order, so the bits are the scalar ones.
    const std::vector<float> columns = padded_columns(kernel.weight);
    const float* Wc = columns.data();
    const bool from_unary = potts && first;
    parallel_for(pixels_, kGrain, threads_, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const float* f = filtered_ + i * S;
            float* a = logits_ + i * S;
            for (int64_t j = 0; j < S; j += 8) {
                vec8 s = splat8(0.0f);
                for (int64_t c = 0; c < L; ++c) s += load8(Wc + c * S + j) * splat8(f[c]);
                store8(a + j, (from_unary ? load8(unary_ + i * S + j) : load8(a + j)) + s);
            }
        }
    });
}

// (L, L) row-major M as its columns, each padded to the row stride S: out[c·S + r] = M[r·L + c].
std::vector<float> MeanField::padded_columns(const float* M) const {
    const int64_t L = labels_, S = stride_;
    std::vector<float> out(L * S, 0.0f);
    for (int64_t r = 0; r < L; ++r)
        for (int64_t c = 0; c < L; ++c) out[c * S + r] = M[r * L + c];
    return out;
}

// Potts: logits_ already holds U + m. Otherwise logits_ holds m: logits = U - mu m, written into logits_.
void MeanField::apply_compatibility() const {
    if (problem_.compat_kind == DYNSEG_COMPAT_POTTS) return;
    const int64_t L = labels_, S = stride_;
    const float* mu = problem_.compat;
    const std::vector<float> columns =
        problem_.compat_kind == DYNSEG_COMPAT_FULL ? padded_columns(mu) : std::vector<float>();
    const float* mu_c = columns.data();
    parallel_for(pixels_, kGrain, threads_, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            float* row = logits_ + i * S;
            if (problem_.compat_kind == DYNSEG_COMPAT_DIAGONAL) {
                for (int64_t a = 0; a < L; ++a) row[a] = unary_[i * S + a] - mu[a] * row[a];
                continue;
            }
            float* m = filtered_ + i * S;  // free once the filters have run
            std::copy(row, row + S, m);
            // lane a of each vector: sum over b of mu[a][b]·m[b] in the scalar order (same bits)
            for (int64_t j = 0; j < S; j += 8) {
                vec8 s = splat8(0.0f);
                for (int64_t b = 0; b < L; ++b) s += load8(mu_c + b * S + j) * splat8(m[b]);
                store8(row + j, load8(unary_ + i * S + j) - s);
            }
        }
    });
}

ivec8 MeanField::lanes_in_use() const {
    const int valid = static_cast<int>(labels_ - (stride_ / 8 - 1) * 8);  // lanes of the last vector
    const ivec8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    return lane < valid;
}

void MeanField::softmax(const float* logits, float* q) const { softmax_range(logits, q, 0, pixels_, threads_); }

void MeanField::softmax_range(const float* logits, float* q, int64_t first, int64_t last, int threads) const {
    const int64_t vectors = stride_ / 8;
    const ivec8 in_use = lanes_in_use();
    parallel_for(last - first, kGrain, threads, [&](int64_t begin, int64_t end) {
        for (int64_t i = first + begin; i < first + end; ++i) {
            const float* x = logits + i * stride_;
            float* y = q + i * stride_;
            switch (vectors) {  // unrolled for the common label counts
                case 1: softmax_row<1>(x, y, vectors, in_use); break;
                case 2: softmax_row<2>(x, y, vectors, in_use); break;
                case 3: softmax_row<3>(x, y, vectors, in_use); break;
                case 4: softmax_row<4>(x, y, vectors, in_use); break;
                default: softmax_row<0>(x, y, vectors, in_use); break;
            }
        }
    });
}

// Leaves L^T in logits_; history (may be null) receives Q^0 .. Q^{T-1}. unary_ must hold U.
void MeanField::run_iterations(float* history) {
    const int64_t size = pixels_ * stride_;
    const int K = problem_.num_kernels;
    const bool potts = problem_.compat_kind == DYNSEG_COMPAT_POTTS;
    bool scalar = true;
    for (int k = 0; k < K; ++k) scalar = scalar && !is_matrix(problem_.kernels[k]);
    if (problem_.iterations == 0 || K == 0) std::copy(unary_, unary_ + size, logits_);
    detections_.start();
    for (int t = 0; t < problem_.iterations; ++t) {
        stop_if_cancelled();
        const float* logits = t == 0 ? unary_ : logits_;
        float* q = history ? history + t * size : q_;
        softmax(logits, q);
        if (K == 0) {
            // no pairwise message: L^t = U, and the detection term below is added onto U afresh
            if (detections_.active()) std::copy(unary_, unary_ + size, logits_);
        } else if (scalar) {
            scalar_messages_all_tiles(q);
            apply_compatibility();
        } else {
            if (!potts) std::fill(logits_, logits_ + size, 0.0f);
            for (int k = 0; k < K; ++k) kernel_message(k, q, k == 0);
            apply_compatibility();
        }
        detections_.add(t, q, logits_, stride_, threads_);
    }
}

// The common case gets a path of its own: one thread, at most one label tile, scalar weights,
// Potts compatibility, at least one kernel and one iteration.
bool MeanField::can_stream() const {
    if (threads_ != 1 || stride_ > kLabelTile || problem_.compat_kind != DYNSEG_COMPAT_POTTS) return false;
    if (problem_.num_kernels == 0 || problem_.iterations == 0 || detections_.active()) return false;
    for (int k = 0; k < problem_.num_kernels; ++k)
        if (is_matrix(problem_.kernels[k])) return false;
    return true;
}

// The streamed path (see can_stream()): each iteration is one pass over the pixels that slices the
// previous iteration's lattices into the pixel's logits, takes their softmax and splats it into
// every lattice's spare buffer, so U is the only array streamed from memory. The messages are summed
// as in scalar_messages (both through add_scalar_messages), so the bits are the same. U comes planar;
// the result goes to logits_ (planar_out null) or planar into planar_out, as logits or probabilities
// (problem_.output).
template <int V>
void MeanField::stream_iterations(const float* unary, float* history, float* planar_out) {
    const int K = problem_.num_kernels;
    const int64_t S = stride_, size = pixels_ * stride_;
    const bool symmetric = problem_.normalization == DYNSEG_NORMALIZE_SYMMETRIC;
    const ivec8 in_use = lanes_in_use();
    // logits of pixel p: U + sum_k w_k (norm_k ⊙ slice_k), from the lattices' blurred values
    auto logits = [&](int64_t p, vec8* a) {
        for (int j = 0; j < V; ++j) a[j] = load8(unary_ + p * S + 8 * j);
        add_scalar_messages<V>(lattices_, norm_, problem_.kernels, K, p, a);
    };
    // Pixels go in blocks: the block's softmaxes are independent, so their long dependency chains
    // (max, exp, sum, divide) overlap instead of waiting on each other's scatter.
    alignas(32) float rows[kBlock][8 * V], q[kBlock][8 * V];
    for (int it = 0; it < problem_.iterations; ++it) {
        stop_if_cancelled();
        for (int k = 0; k < K; ++k) lattices_[k].clear<V>(true);
        for (int64_t p0 = 0; p0 < pixels_; p0 += kBlock) {
            const int64_t count = std::min(kBlock, pixels_ - p0);
            if (it == 0) {
                // U arrives planar: gathered here into pixel rows (plane by plane, each read
                // contiguous), and kept in unary_ for the later iterations
                for (int64_t b = 0; b < count; ++b)
                    for (int64_t l = labels_; l < S; ++l) rows[b][l] = 0.0f;
                for (int64_t l = 0; l < labels_; ++l)
                    for (int64_t b = 0; b < count; ++b) rows[b][l] = unary[l * pixels_ + p0 + b];
                std::memcpy(unary_ + p0 * S, rows, count * sizeof(rows[0]));
            } else {
                for (int64_t b = 0; b < count; ++b) {
                    vec8 a[V];
                    logits(p0 + b, a);
                    for (int j = 0; j < V; ++j) store8(rows[b] + 8 * j, a[j]);
                }
            }
            block_softmax<V>(rows, q, count, in_use);
            if (history) std::memcpy(history + it * size + p0 * S, q, count * sizeof(q[0]));
            for (int64_t b = 0; b < count; ++b) {
                const int64_t p = p0 + b;
                vec8 x[V];
                for (int k = 0; k < K; ++k) {
                    for (int j = 0; j < V; ++j)
                        x[j] = symmetric ? load8(q[b] + 8 * j) * splat8(norm_[k][p]) : load8(q[b] + 8 * j);
                    lattices_[k].scatter<V>(p, x, true);
                }
            }
        }
        for (int k = 0; k < K; ++k) {
            lattices_[k].flip();
            lattices_[k].blur<V>(false);
        }
    }
    // L^T: into logits_, or straight into the caller's planar output (as probabilities if asked)
    if (!planar_out) {
        for (int64_t p = 0; p < pixels_; ++p) {
            vec8 a[V];
            logits(p, a);
            for (int j = 0; j < V; ++j) store8(logits_ + p * S + 8 * j, a[j]);
        }
        return;
    }
    const bool probabilities = problem_.output == DYNSEG_OUTPUT_PROBABILITIES;
    for (int64_t p0 = 0; p0 < pixels_; p0 += kBlock) {
        const int64_t count = std::min(kBlock, pixels_ - p0);
        for (int64_t b = 0; b < count; ++b) {
            vec8 a[V];
            logits(p0 + b, a);
            for (int j = 0; j < V; ++j) store8(rows[b] + 8 * j, a[j]);
        }
        if (probabilities) block_softmax<V>(rows, q, count, in_use);
        const float (*result)[8 * V] = probabilities ? q : rows;
        for (int64_t l = 0; l < labels_; ++l)
            for (int64_t b = 0; b < count; ++b) planar_out[l * pixels_ + p0 + b] = result[b][l];
    }
}

void MeanField::stream_iterations(const float* unary, float* history, float* planar_out) {
    switch (stride_ / 8) {
        case 1: stream_iterations<1>(unary, history, planar_out); break;
        case 2: stream_iterations<2>(unary, history, planar_out); break;
        case 3: stream_iterations<3>(unary, history, planar_out); break;
        default: stream_iterations<4>(unary, history, planar_out); break;
    }
}

void MeanField::scalar_messages_all_tiles(const float* q) {
    for (int64_t c0 = 0; c0 < stride_; c0 += kLabelTile) {
        switch (std::min<int64_t>(kLabelTile, stride_ - c0) / 8) {
            case 1: scalar_messages<1>(c0, q); break;
            case 2: scalar_messages<2>(c0, q); break;
            case 3: scalar_messages<3>(c0, q); break;
            default: scalar_messages<4>(c0, q); break;
        }
    }
}

// Four paths, one result (bit for bit where they overlap): the streamed one (can_stream: one thread,
// one label tile, scalar weights, Potts, no detection potential); otherwise run_iterations with no
// kernel, with scalar weights (scalar_messages_all_tiles) or with matrix weights (kernel_message).
void MeanField::forward(const float* unary, float* out) {
    if (can_stream()) {
        stream_iterations(unary, nullptr, out);
        return;
    }
    to_pixel_major(unary, unary_, labels_);
    run_iterations(nullptr);
    to_planar(logits_, out, labels_, problem_.output == DYNSEG_OUTPUT_PROBABILITIES);
}

bool MeanField::filter(int kernel, int64_t channels, const float* values, float* out, bool transpose,
                       char* error, int error_len) {
    if (!lattices_[kernel].build(specs_[kernel], scratch_, threads_, error, error_len)) return false;
    to_pixel_major(values, q_, channels);
    FilterOutput output;
    output.out = filtered_;
    lattices_[kernel].filter(q_, padded_to_vec8(channels), nullptr, transpose, output);
    to_planar(filtered_, out, channels);
    return true;
}

}  // namespace dynseg
