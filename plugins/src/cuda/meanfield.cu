// meanfield.cu: the CRF-as-RNN mean-field update on the GPU, forward and backward (docs/crf.md derives
// both; plugins/src/meanfield.cpp is the CPU twin).
//
// Per iteration:  F_k = Knorm_k(Q);  L = U - mu . sum_k W_k F_k [+ the detection potential's term];  Q = softmax(L).
// Potts (mu = -I) adds the messages to the unary in kernel order, as the CPU does. The parameter
// gradients come from P_k = sum_i (Knorm_k^T G)_i Q_i^T, summed in double over fixed pixel chunks and
// then over the chunks in order, so they are the same bits on every run.
#include "meanfield.cuh"

#include <cmath>

namespace dynseg {
namespace cuda {
namespace {

constexpr int64_t kMaxPartials = int64_t(8) << 20;  // doubles of per-chunk partial sums (64 MiB)

// dst[c][r] = src[r][c] for the rows r < rows and columns c < columns of src, through 32×32 tiles
// in shared memory so that both sides are read and written along their rows. Each dst row's entries
// r in [rows, dst_stride) are zero padding; everything is NaN when status says a lattice failed. It turns
// (L, N) planar arrays into (N, stride) pixel-major ones and back.
constexpr int kTile = 32;

__global__ void transpose(const float* src, int64_t rows, int64_t columns, int64_t src_stride, float* dst,
                          int64_t dst_stride, Status* status) {
    __shared__ float tile[kTile][kTile + 1];
    const bool failed = status && status->code != 0;
    const int64_t row_tiles = (dst_stride + kTile - 1) / kTile, tiles = row_tiles * ((columns + kTile - 1) / kTile);
    const int x = threadIdx.x % kTile, y = threadIdx.x / kTile;
    for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
        const int64_t r0 = t % row_tiles * kTile, c0 = t / row_tiles * kTile;
        for (int j = y; j < kTile; j += kThreads / kTile) {
            const int64_t r = r0 + j, c = c0 + x;
            tile[j][x] = r < rows && c < columns ? src[r * src_stride + c] : 0.0f;
        }
        __syncthreads();
        for (int j = y; j < kTile; j += kThreads / kTile) {
            const int64_t c = c0 + j, r = r0 + x;
            if (c >= columns || r >= dst_stride) continue;
            const float value = failed ? __int_as_float(0x7fc00000) : tile[x][j];
            dst[c * dst_stride + r] = value;
            if (status && !failed) note_if_nonfinite(status, value);
        }
        __syncthreads();
    }
}

// (L, N) planar -> (N, stride) pixel-major, zero padding
void to_pixel_major(const float* planar, float* rows, int64_t labels, int64_t pixels, int64_t stride,
                    const Launch& launch) {
    const int64_t tiles = ((stride + kTile - 1) / kTile) * ((pixels + kTile - 1) / kTile);
    transpose<<<launch.blocks(tiles * kThreads), kThreads, 0, launch.stream>>>(planar, labels, pixels, pixels, rows,
                                                                              stride, nullptr);
}

// (N, stride) -> (L, N); NaN everywhere when a lattice could not be built
void to_planar(const float* rows, float* planar, int64_t labels, int64_t pixels, int64_t stride, Status* status,
               const Launch& launch) {
    const int64_t tiles = ((pixels + kTile - 1) / kTile) * ((labels + kTile - 1) / kTile);
    transpose<<<launch.blocks(tiles * kThreads), kThreads, 0, launch.stream>>>(rows, pixels, labels, stride, planar,
                                                                              pixels, status);
}

// Softmax of rows of at most kTileRow floats, a block's rows through shared memory (padded to an odd
// length there, so that a thread per row meets no bank conflicts), so that loads and stores are
// coalesced in either layout: pixel-major (N, stride) rows are one stretch of memory, planar (L, N)
// ones a stretch per label. A planar input's rows also go to `copy`, pixel-major and zero padded
// (the start of mean field: U for the iterations, and Q^0 from it); a planar output is NaN
// everywhere when status says a lattice failed (the end: Q out of the call).
constexpr int kTileRow = 32;

// Pixel-major rows are whole float4s (stride is a multiple of 4): a quarter of the loads, stores and
// index divisions.
__device__ inline void rows_to_tile(const float* rows, float* tile, int quads, int row_quads, int64_t pitch) {
    const float4* in = reinterpret_cast<const float4*>(rows);
    for (int i = threadIdx.x; i < quads; i += kThreads) {
        const float4 v = in[i];
        float* t = tile + (i / row_quads) * pitch + 4 * (i % row_quads);
        t[0] = v.x;
        t[1] = v.y;
        t[2] = v.z;
        t[3] = v.w;
    }
}

__device__ inline void tile_to_rows(const float* tile, float* rows, int quads, int row_quads, int64_t pitch) {
    float4* out = reinterpret_cast<float4*>(rows);
    for (int i = threadIdx.x; i < quads; i += kThreads) {
        const float* t = tile + (i / row_quads) * pitch + 4 * (i % row_quads);
        out[i] = float4{t[0], t[1], t[2], t[3]};
    }
}

__global__ void softmax_short_rows(const float* in, bool planar_in, float* copy, float* out, bool planar_out,
                                   Status* status, int64_t labels, int64_t pixels, int64_t stride) {
    __shared__ float tile[kThreads * (kTileRow + 1)];
    const int64_t pitch = stride + 1;
    const bool failed = planar_out && status && status->code != 0;
    float* x = tile + threadIdx.x * pitch;  // this thread's row
    for (int64_t first = blockIdx.x * int64_t(kThreads); first < pixels; first += int64_t(gridDim.x) * kThreads) {
        const int64_t rows = min(int64_t(kThreads), pixels - first);
        const int quads = static_cast<int>(rows * stride / 4), row_quads = static_cast<int>(stride / 4);
        if (!planar_in) {
            rows_to_tile(in + first * stride, tile, quads, row_quads, pitch);
        } else if (threadIdx.x < rows) {
            for (int64_t l = 0; l < stride; ++l) x[l] = l < labels ? in[l * pixels + first + threadIdx.x] : 0.0f;
        }
        __syncthreads();
        if (copy) {
            tile_to_rows(tile, copy + first * stride, quads, row_quads, pitch);
            __syncthreads();
        }
        if (threadIdx.x < rows) {
            float top = -INFINITY;
            for (int64_t l = 0; l < labels; ++l) top = fmaxf(top, x[l]);
            float sum = 0.0f;
            for (int64_t l = 0; l < labels; ++l) {
                x[l] = expf(x[l] - top);
                sum += x[l];
            }
            const float inverse = 1.0f / sum;
            for (int64_t l = 0; l < labels; ++l) x[l] *= inverse;
            for (int64_t l = labels; l < stride; ++l) x[l] = 0.0f;
            if (planar_out)
                for (int64_t l = 0; l < labels; ++l) {
                    const float value = failed ? __int_as_float(0x7fc00000) : x[l];
                    out[l * pixels + first + threadIdx.x] = value;
                    if (status && !failed) note_if_nonfinite(status, value);
                }
        }
        __syncthreads();
        if (!planar_out) {
            tile_to_rows(tile, out + first * stride, quads, row_quads, pitch);
            __syncthreads();
        }
    }
}

// Longer rows: a warp per row, lanes across the labels, reductions in a fixed shuffle order.
__global__ void softmax_long_rows(const float* logits, float* q, int64_t labels, int64_t pixels, int64_t stride) {
    const int lane = threadIdx.x % 32;
    const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
    for (int64_t p = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32; p < pixels; p += warps) {
        const float* x = logits + p * stride;
        float* y = q + p * stride;
        float top = -INFINITY;
        for (int64_t l = lane; l < labels; l += 32) top = fmaxf(top, x[l]);
        for (int offset = 16; offset > 0; offset /= 2) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, offset));
        float sum = 0.0f;
        for (int64_t l = lane; l < labels; l += 32) {
            const float e = expf(x[l] - top);
            y[l] = e;
            sum += e;
        }
        for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        const float inverse = 1.0f / sum;
        for (int64_t l = lane; l < stride; l += 32) y[l] = l < labels ? y[l] * inverse : 0.0f;
    }
}

__global__ void add_into(float* a, const float* b, int64_t count) {
    DYNSEG_FOR_EACH(i, count) a[i] += b[i];
}

// acc_r = (U_r or acc_r) + sum_c W[r][c] F_c
__global__ void matrix_message(const float* filtered, const float* W, const float* unary, float* acc, int64_t labels,
                               int64_t pixels, int64_t stride, bool from_unary) {
    DYNSEG_FOR_EACH(i, pixels * labels) {
        const uint32_t p = i / uint32_t(labels), r = (i % uint32_t(labels));
        const float* f = filtered + p * stride;
        float s = 0.0f;
        for (int64_t c = 0; c < labels; ++c) s += W[r * labels + c] * f[c];
        acc[p * stride + r] = (from_unary ? unary[p * stride + r] : acc[p * stride + r]) + s;
    }
}

__global__ void diagonal_logits(float* acc, const float* unary, const float* mu, int64_t labels, int64_t pixels,
                                int64_t stride) {
    DYNSEG_FOR_EACH(i, pixels * labels) {
        const uint32_t p = i / uint32_t(labels), a = (i % uint32_t(labels));
        acc[p * stride + a] = unary[p * stride + a] - mu[a] * acc[p * stride + a];
    }
}

__global__ void full_logits(const float* m, const float* unary, const float* mu, float* out, int64_t labels,
                            int64_t pixels, int64_t stride) {
    DYNSEG_FOR_EACH(i, pixels * labels) {
        const uint32_t p = i / uint32_t(labels), a = (i % uint32_t(labels));
        float s = 0.0f;
        for (int64_t b = 0; b < labels; ++b) s += mu[a * labels + b] * m[p * stride + b];
        out[p * stride + a] = unary[p * stride + a] - s;
    }
}

// H = -mu^T R: the gradient with respect to the message
__global__ void message_gradient(const float* R, const float* mu, int compat_kind, float* h, int64_t labels,
                                 int64_t pixels, int64_t stride) {
    DYNSEG_FOR_EACH(i, pixels * stride) {
        const uint32_t p = i / uint32_t(stride), a = (i % uint32_t(stride));
        const float* r = R + p * stride;
        float v = 0.0f;
        if (a < labels) {
            if (compat_kind == DYNSEG_COMPAT_POTTS) {
                v = r[a];
            } else if (compat_kind == DYNSEG_COMPAT_DIAGONAL) {
                v = -mu[a] * r[a];
            } else {
                float s = 0.0f;
                for (int64_t b = 0; b < labels; ++b) s += mu[b * labels + a] * r[b];
                v = -s;
            }
        }
        h[i] = v;
    }
}

// dQ += W_k^T H
__global__ void add_weighted_gradient(const float* h, const float* W, bool matrix, float* gq, int64_t labels,
                                      int64_t pixels, int64_t stride) {
    DYNSEG_FOR_EACH(i, pixels * labels) {
        const uint32_t p = i / uint32_t(labels), b = (i % uint32_t(labels));
        const float* hp = h + p * stride;
        if (!matrix) {
            gq[p * stride + b] += W[0] * hp[b];
            continue;
        }
        float s = 0.0f;
        for (int64_t a = 0; a < labels; ++a) s += W[a * labels + b] * hp[a];
        gq[p * stride + b] += s;
    }
}

// Blocks (c, *): chunk c's sum of R_i Q_i^T, all of it (full) or its diagonal, in double and pixel
// order. Each entry is one thread's sum, so splitting the entries over the grid's y blocks changes
// no bit; it keeps a large L, whose L x L entries leave room for one chunk only, off one block.
__global__ void gradient_chunk_sums(const float* R, const float* Q, int64_t labels, int64_t pixels,
                                    int64_t stride, int64_t chunk, bool full, double* partial) {
    const int64_t width = full ? labels * labels : labels;
    const int64_t c = blockIdx.x, first = c * chunk, last = min(pixels, first + chunk);
    const int64_t step = int64_t(gridDim.y) * blockDim.x;
    for (int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; j < width; j += step) {
        const int64_t a = full ? j / labels : j, b = full ? j % labels : j;
        double s = 0.0;
        for (int64_t i = first; i < last; ++i) s += double(R[i * stride + a]) * Q[i * stride + b];
        partial[c * width + j] = s;
    }
}

// P: all of it, (L, L), or only its diagonal, (L,), as the chunks hold it.
__global__ void sum_chunks(const double* partial, int64_t chunks, int64_t labels, bool full, double* P) {
    const int64_t width = full ? labels * labels : labels;
    DYNSEG_FOR_EACH(j, width) {
        double s = 0.0;
        for (int64_t c = 0; c < chunks; ++c) s += partial[c * width + j];
        P[j] = s;
    }
}

__device__ double mu_at(const float* mu, int kind, int64_t labels, int64_t a, int64_t b) {
    if (kind == DYNSEG_COMPAT_POTTS) return a == b ? -1.0 : 0.0;
    if (kind == DYNSEG_COMPAT_DIAGONAL) return a == b ? double(mu[a]) : 0.0;
    return mu[a * labels + b];
}

// dW = -tr(mu^T P) for a scalar weight, one block, a fixed reduction tree: over all of P for a full
// mu, else over the diagonal that P then holds alone.
__global__ void scalar_weight_gradient(const double* P, bool full, const float* mu, int kind, int64_t labels,
                                       double* dweight) {
    __shared__ double partial[kThreads];
    double s = 0.0;
    for (int64_t j = threadIdx.x; j < (full ? labels * labels : labels); j += blockDim.x)
        s -= (full ? double(mu[j]) : mu_at(mu, kind, labels, j, j)) * P[j];
    partial[threadIdx.x] = s;
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) dweight[0] += partial[0];
}

// From all of P: dW = -mu^T P for a matrix weight; dmu = -P W_k^T (only the diagonal for a diagonal mu).
__global__ void matrix_gradients(const double* P, const float* mu, int kind, const float* W, bool matrix,
                                 int64_t labels, double* dweight, double* dmu) {
    DYNSEG_FOR_EACH(j, labels * labels) {
        const uint32_t a = j / uint32_t(labels), b = (j % uint32_t(labels));
        if (matrix) {
            double s = 0.0;
            if (kind != DYNSEG_COMPAT_FULL)
                s = -mu_at(mu, kind, labels, a, a) * P[a * labels + b];
            else
                for (int64_t c = 0; c < labels; ++c) s -= double(mu[c * labels + a]) * P[c * labels + b];
            dweight[j] += s;
        }
        if (kind == DYNSEG_COMPAT_POTTS || (kind == DYNSEG_COMPAT_DIAGONAL && a != b)) continue;
        double s = 0.0;
        if (!matrix)
            s = double(W[0]) * P[a * labels + b];
        else
            for (int64_t c = 0; c < labels; ++c) s += P[a * labels + c] * double(W[b * labels + c]);
        if (kind == DYNSEG_COMPAT_FULL)
            dmu[j] -= s;
        else
            dmu[a] -= s;
    }
}

// dmu = -w P for a diagonal mu and a scalar weight w, from P's diagonal.
__global__ void diagonal_compat_gradient(const double* P, const float* w, int64_t labels, double* dmu) {
    DYNSEG_FOR_EACH(a, labels) dmu[a] -= double(w[0]) * P[a];
}

// G = Q . (dQ - <dQ, Q>)
__global__ void softmax_backward(const float* Q, const float* gq, float* grad, int64_t labels, int64_t pixels,
                                 int64_t stride) {
    DYNSEG_FOR_EACH(p, pixels) {
        const float* q = Q + p * stride;
        const float* g = gq + p * stride;
        float dot = 0.0f;
        for (int64_t l = 0; l < labels; ++l) dot += g[l] * q[l];
        for (int64_t l = 0; l < labels; ++l) grad[p * stride + l] = q[l] * (g[l] - dot);
    }
}

__global__ void to_float(const double* in, float* out, int64_t count, Status* status) {
    const bool failed = status->code != 0;
    DYNSEG_FOR_EACH(i, count) {
        out[i] = failed ? __int_as_float(0x7fc00000) : static_cast<float>(in[i]);
        if (!failed) note_if_nonfinite(status, out[i]);
    }
}

}  // namespace

cudaError_t kernel_image_status() {
    cudaFuncAttributes attributes;
    return cudaFuncGetAttributes(&attributes, add_into);
}

MeanField::MeanField(const dynseg_crf_problem& problem, int pass, Workspace& ws)
    : problem_(problem), status_(ws.take<Status>(1)),  // first, where dynseg_crf_check_cuda looks for it
      detections_(problem, pass, ws) {
    labels_ = problem.num_labels;
    stride_ = padded_to_float4(labels_);
    pixels_ = problem.height * problem.width;
    int max_dim = 2;
    const int64_t value_width = std::min<int64_t>(kLabelTile, stride_);  // one label tile per filter pass
    for (int k = 0; k < problem.num_kernels; ++k) {
        const FeatureSpec& s = specs_[k] = feature_spec(problem, k);
        lattices_[k].plan(ws, s, value_width);
        max_dim = std::max(max_dim, s.dim());
    }
    norm_ = ws.take<float>(problem.num_kernels * pixels_);
    const int64_t max_entries = pixels_ * (max_dim + 1);
    if (problem.num_kernels > 0) scratch_.plan(ws, max_entries);
    const int64_t size = pixels_ * stride_;
    unary_ = ws.take<float>(size);
    q_ = ws.take<float>(size);
    filtered_ = ws.take<float>(size);
    acc_ = ws.take<float>(size);
    if (pass == DYNSEG_PASS_BACKWARD) {
        const int64_t L = labels_;
        history_ = ws.take<float>(size * problem.iterations);
        grad_logits_ = ws.take<float>(size);
        grad_q_ = ws.take<float>(size);
        grad_unary_ = ws.take<float>(size);
        grad_message_ = ws.take<float>(size);
        // P takes L x L doubles only where a matrix weight or a full mu reads all of it; else its diagonal
        bool full = problem.compat_kind == DYNSEG_COMPAT_FULL;
        for (int k = 0; k < problem.num_kernels; ++k) full = full || is_matrix(problem.kernels[k]);
        const int64_t width = full ? L * L : L;
        const int64_t most_chunks =
            std::max<int64_t>(1, std::min<int64_t>((pixels_ + 255) / 256, kMaxPartials / width));
        reduce_chunk_ = (pixels_ + most_chunks - 1) / most_chunks;
        partial_ = ws.take<double>(most_chunks * width);
        P_ = ws.take<double>(width);
        for (int k = 0; k < problem.num_kernels; ++k) dweight_[k] = ws.take<double>(weight_count(problem.kernels[k], L));
        dmu_ = ws.take<double>(compat_count(problem.compat_kind, L));
    }
}

void MeanField::prepare(const Launch& launch) {
    cudaMemsetAsync(status_, 0, sizeof(Status), launch.stream);
    for (int k = 0; k < problem_.num_kernels; ++k) lattices_[k].build(specs_[k], scratch_, k, status_, launch);
    if (problem_.num_kernels > 0)
        normalisers(lattices_, problem_.num_kernels, norm_, problem_.normalization == DYNSEG_NORMALIZE_SYMMETRIC,
                    launch);
}

void MeanField::softmax(const float* logits, float* q, const Launch& launch) const {
    if (stride_ <= kTileRow)
        softmax_short_rows<<<launch.blocks(pixels_), kThreads, 0, launch.stream>>>(logits, false, nullptr, q, false,
                                                                                   nullptr, labels_, pixels_, stride_);
    else
        softmax_long_rows<<<launch.blocks(32 * pixels_), kThreads, 0, launch.stream>>>(logits, q, labels_, pixels_,
                                                                                     stride_);
}

// acc (+)= sum_k W_k Knorm_k(Q), in kernel order. "after": Knorm = D K; "symmetric": D^1/2 K D^1/2.
// Scalar weights add each message straight into acc, so all the kernels filter together; a matrix
// weight needs its kernel's message alone first (in filtered_), so then they filter one at a time.
void MeanField::messages(const float* q, const Launch& launch) {
    const int K = problem_.num_kernels;
    const bool potts = problem_.compat_kind == DYNSEG_COMPAT_POTTS;
    const float* pre = problem_.normalization == DYNSEG_NORMALIZE_SYMMETRIC ? norm_ : nullptr;
    FilterOutput out[DYNSEG_MAX_KERNELS];
    bool any_matrix = false;
    for (int k = 0; k < K; ++k) {
        out[k].scale = norm(k);
        if (is_matrix(problem_.kernels[k])) {
            any_matrix = true;
            out[k].out = filtered_;
        } else {
            // non-Potts accumulators start at 0, Potts ones at U
            out[k].mode = potts && k == 0 ? FilterOutput::kFromBase : FilterOutput::kAccumulate;
            out[k].out = acc_;
            out[k].base = unary_;
            out[k].weight = problem_.kernels[k].weight;
        }
    }
    if (!any_matrix) {
        filter(lattices_, K, q, stride_, pre, false, out, launch);
        return;
    }
    for (int k = 0; k < K; ++k) {
        filter(&lattices_[k], 1, q, stride_, pre ? norm(k) : nullptr, false, &out[k], launch);
        if (is_matrix(problem_.kernels[k]))
            matrix_message<<<launch.blocks(pixels_ * labels_), kThreads, 0, launch.stream>>>(
                filtered_, problem_.kernels[k].weight, unary_, acc_, labels_, pixels_, stride_, potts && k == 0);
    }
}

// Potts: acc already holds U + m. Otherwise acc holds m: logits = U - mu m.
void MeanField::apply_compatibility(const Launch& launch) {
    const int blocks = launch.blocks(pixels_ * labels_);
    if (problem_.compat_kind == DYNSEG_COMPAT_DIAGONAL) {
        diagonal_logits<<<blocks, kThreads, 0, launch.stream>>>(acc_, unary_, problem_.compat, labels_, pixels_,
                                                                stride_);
    } else if (problem_.compat_kind == DYNSEG_COMPAT_FULL) {
        full_logits<<<blocks, kThreads, 0, launch.stream>>>(acc_, unary_, problem_.compat, filtered_, labels_, pixels_,
                                                            stride_);
        std::swap(acc_, filtered_);
    }
}

// unary_ = U (from planar (L, N)), and Q^0 = softmax(U) into q, in one pass where rows are short.
void MeanField::start(const float* unary, float* q, const Launch& launch) {
    if (stride_ <= kTileRow) {
        softmax_short_rows<<<launch.blocks(pixels_), kThreads, 0, launch.stream>>>(unary, true, unary_, q, false,
                                                                                   nullptr, labels_, pixels_, stride_);
        return;
    }
    to_pixel_major(unary, unary_, labels_, pixels_, stride_, launch);
    softmax(unary_, q, launch);
}

// out (L, N) = the call's result, softmax(acc_) or acc_ itself (NaN if a lattice failed).
void MeanField::finish(float* out, const Launch& launch) {
    const bool probabilities = problem_.output == DYNSEG_OUTPUT_PROBABILITIES;
    if (probabilities && stride_ <= kTileRow) {
        softmax_short_rows<<<launch.blocks(pixels_), kThreads, 0, launch.stream>>>(acc_, false, nullptr, out, true,
                                                                                   status_, labels_, pixels_, stride_);
        return;
    }
    if (probabilities) softmax(acc_, q_, launch);
    to_planar(probabilities ? q_ : acc_, out, labels_, pixels_, stride_, status_, launch);
}

// Leaves L^T in acc_; history (may be null) receives Q^0 .. Q^{T-1}. start() must have run, with
// Q^0 going where iteration 0 reads it (history, else q_).
void MeanField::run_iterations(float* history, const Launch& launch) {
    const int64_t size = pixels_ * stride_;
    const int K = problem_.num_kernels;
    if (problem_.iterations == 0 || K == 0)
        cudaMemcpyAsync(acc_, unary_, size * sizeof(float), cudaMemcpyDeviceToDevice, launch.stream);
    detections_.start(launch);
    for (int t = 0; t < problem_.iterations; ++t) {
        float* q = history ? history + t * size : q_;
        if (t > 0) softmax(acc_, q, launch);
        if (K == 0) {
            if (detections_.active())
                cudaMemcpyAsync(acc_, unary_, size * sizeof(float), cudaMemcpyDeviceToDevice, launch.stream);
        } else {
            if (problem_.compat_kind != DYNSEG_COMPAT_POTTS)
                cudaMemsetAsync(acc_, 0, size * sizeof(float), launch.stream);
            messages(q, launch);
            apply_compatibility(launch);
        }
        detections_.add(t, q, acc_, stride_, launch);
    }
}

void MeanField::forward(const float* unary, float* out, const Launch& launch) {
    prepare(launch);
    start(unary, q_, launch);
    run_iterations(nullptr, launch);
    finish(out, launch);
    detections_.finish(status_, launch);
}

void MeanField::backward(const float* unary, const float* grad_logits, float* grad_unary, float* const* grad_weights,
                         float* grad_compat, const Launch& launch) {
    const int64_t L = labels_, S = stride_, N = pixels_, size = N * S;
    cudaStream_t stream = launch.stream;
    prepare(launch);
    start(unary, problem_.iterations > 0 ? history_ : q_, launch);
    run_iterations(history_, launch);
    to_pixel_major(grad_logits, grad_logits_, L, N, S, launch);
    cudaMemsetAsync(grad_unary_, 0, size * sizeof(float), stream);
    const int kind = problem_.compat_kind;
    for (int k = 0; k < problem_.num_kernels; ++k)
        cudaMemsetAsync(dweight_[k], 0, weight_count(problem_.kernels[k], L) * sizeof(double), stream);
    cudaMemsetAsync(dmu_, 0, compat_count(kind, L) * sizeof(double), stream);
    detections_.start_backward(launch);
    const int64_t chunks = (N + reduce_chunk_ - 1) / reduce_chunk_;

    for (int t = problem_.iterations - 1; t >= 0; --t) {
        const float* Q = history_ + t * size;
        add_into<<<launch.blocks(size), kThreads, 0, stream>>>(grad_unary_, grad_logits_, size);
        cudaMemsetAsync(grad_q_, 0, size * sizeof(float), stream);
        for (int k = 0; k < problem_.num_kernels; ++k) {
            const dynseg_kernel& kernel = problem_.kernels[k];
            // R = Knorm^T G (into filtered_): "after" K^T D, "symmetric" D^1/2 K^T D^1/2
            FilterOutput out;
            out.out = filtered_;
            out.scale = problem_.normalization == DYNSEG_NORMALIZE_SYMMETRIC ? norm(k) : nullptr;
            filter(&lattices_[k], 1, grad_logits_, S, norm(k), true, &out, launch);
            message_gradient<<<launch.blocks(size), kThreads, 0, stream>>>(filtered_, problem_.compat, kind,
                                                                           grad_message_, L, N, S);
            add_weighted_gradient<<<launch.blocks(N * L), kThreads, 0, stream>>>(grad_message_, kernel.weight,
                                                                                 is_matrix(kernel), grad_q_, L, N, S);
            // P = sum_i R_i Q_i^T: in full when a matrix needs it, else only its diagonal
            const bool full = is_matrix(kernel) || kind == DYNSEG_COMPAT_FULL;
            const int64_t entries = full ? L * L : L;
            const auto slices = static_cast<unsigned>(std::min<int64_t>((entries + kThreads - 1) / kThreads, 65535));
            gradient_chunk_sums<<<dim3(static_cast<unsigned>(chunks), slices), kThreads, 0, stream>>>(
                filtered_, Q, L, N, S, reduce_chunk_, full, partial_);
            sum_chunks<<<launch.blocks(entries), kThreads, 0, stream>>>(partial_, chunks, L, full, P_);
            if (!is_matrix(kernel))
                scalar_weight_gradient<<<1, kThreads, 0, stream>>>(P_, full, problem_.compat, kind, L, dweight_[k]);
            if (full)
                matrix_gradients<<<launch.blocks(L * L), kThreads, 0, stream>>>(
                    P_, problem_.compat, kind, kernel.weight, is_matrix(kernel), L, dweight_[k], dmu_);
            else if (kind == DYNSEG_COMPAT_DIAGONAL)
                diagonal_compat_gradient<<<launch.blocks(L), kThreads, 0, stream>>>(P_, kernel.weight, L, dmu_);
        }
        detections_.backward(t, grad_logits_, grad_q_, S, launch);
        softmax_backward<<<launch.blocks(N), kThreads, 0, stream>>>(Q, grad_q_, grad_logits_, L, N, S);
    }
    add_into<<<launch.blocks(size), kThreads, 0, stream>>>(grad_unary_, grad_logits_, size);
    to_planar(grad_unary_, grad_unary, L, N, S, status_, launch);
    for (int k = 0; k < problem_.num_kernels; ++k)
        if (grad_weights && grad_weights[k]) {
            const int64_t count = weight_count(problem_.kernels[k], L);
            to_float<<<launch.blocks(count), kThreads, 0, stream>>>(dweight_[k], grad_weights[k], count, status_);
        }
    if (grad_compat && kind != DYNSEG_COMPAT_POTTS) {
        const int64_t count = compat_count(kind, L);
        to_float<<<launch.blocks(count), kThreads, 0, stream>>>(dmu_, grad_compat, count, status_);
    }
    detections_.finish_backward(status_, launch);
    detections_.finish(status_, launch);
}

}  // namespace cuda
}  // namespace dynseg
