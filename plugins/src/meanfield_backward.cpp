// meanfield_backward.cpp: the gradient of the mean field (docs/crf.md derives it). Backward walks the
// iterations in reverse with the transposed filters (blur axes d..0); the parameter gradients come from
// P_k = sum_i (Knorm_k^T G)_i Q_i^T, reduced over fixed pixel chunks in double so the result does not
// depend on the thread count. The detection potential walks back with them (DetectionPotential::backward).
#include <algorithm>
#include <vector>

#include "boundary.h"
#include "meanfield.h"
#include "parallel.h"

namespace dynseg {

void MeanField::backward(const float* unary, const float* grad_logits, float* grad_unary,
                         float* const* grad_weights, float* grad_compat) {
    const int64_t L = labels_, S = stride_, N = pixels_, size = N * S;
    if (can_stream()) {
        stream_iterations(unary, history_, nullptr);
    } else {
        to_pixel_major(unary, unary_, L);
        run_iterations(history_);
    }
    to_pixel_major(grad_logits, grad_logits_, L);
    std::fill(grad_unary_, grad_unary_ + size, 0.0f);

    const int kind = problem_.compat_kind;
    std::vector<double> dweight[DYNSEG_MAX_KERNELS];
    for (int k = 0; k < problem_.num_kernels; ++k) dweight[k].assign(weight_count(problem_.kernels[k], L), 0.0);
    std::vector<double> dmu(compat_count(kind, L), 0.0);
    std::vector<double> P;  // L x L, or its diagonal alone where nothing reads the rest (as partial_)
    detections_.start_backward();

    for (int t = problem_.iterations - 1; t >= 0; --t) {
        stop_if_cancelled();
        const float* Q = history_ + t * size;
        for (int64_t i = 0; i < size; ++i) grad_unary_[i] += grad_logits_[i];
        std::fill(grad_q_, grad_q_ + size, 0.0f);
        for (int k = 0; k < problem_.num_kernels; ++k) kernel_backward(k, Q, P, dweight[k], dmu);
        detections_.backward(t, grad_logits_, grad_q_, S, threads_);
        // softmax backward: G = Q . (dQ - <dQ, Q>)
        parallel_for(N, kGrain, threads_, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
                const float* q = Q + i * S;
                const float* gq = grad_q_ + i * S;
                float dot = 0.0f;
                for (int64_t l = 0; l < L; ++l) dot += gq[l] * q[l];
                for (int64_t l = 0; l < L; ++l) grad_logits_[i * S + l] = q[l] * (gq[l] - dot);
            }
        });
    }
    for (int64_t i = 0; i < size; ++i) grad_unary_[i] += grad_logits_[i];
    to_planar(grad_unary_, grad_unary, L);
    for (int k = 0; k < problem_.num_kernels; ++k)
        if (grad_weights && grad_weights[k])
            for (size_t j = 0; j < dweight[k].size(); ++j) grad_weights[k][j] = static_cast<float>(dweight[k][j]);
    if (grad_compat)
        for (size_t j = 0; j < dmu.size(); ++j) grad_compat[j] = static_cast<float>(dmu[j]);
    detections_.finish_backward();
}

// Kernel k's part of walking back iteration t, whose softmax gave Q = Q^t: dQ += W_k^T H into grad_q_, and
// the gradients of its weight and of mu added into dweight and dmu. P is the caller's, so that its memory
// is reused from kernel to kernel.
void MeanField::kernel_backward(int k, const float* Q, std::vector<double>& P, std::vector<double>& dweight,
                                std::vector<double>& dmu) {
    const int64_t L = labels_, S = stride_, N = pixels_;
    const int kind = problem_.compat_kind;
    const float* mu = problem_.compat;
    const int64_t chunks = (N + reduce_chunk_ - 1) / reduce_chunk_;
    const dynseg_kernel& kernel = problem_.kernels[k];
    // R = Knorm^T G (into filtered_): "after" K^T D, "symmetric" D^1/2 K^T D^1/2
    FilterOutput out;
    out.out = filtered_;
    out.scale = problem_.normalization == DYNSEG_NORMALIZE_SYMMETRIC ? norm_[k] : nullptr;
    lattices_[k].filter(grad_logits_, S, norm_[k], true, out);
    const float* R = filtered_;
    // H = -mu^T R, the gradient w.r.t. the message; dQ += W_k^T H
    parallel_for(N, kGrain, threads_, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const float* r = R + i * S;
            float* h = grad_message_ + i * S;
            if (kind == DYNSEG_COMPAT_POTTS)
                std::copy(r, r + L, h);
            else if (kind == DYNSEG_COMPAT_DIAGONAL)
                for (int64_t a = 0; a < L; ++a) h[a] = -mu[a] * r[a];
            else
                for (int64_t a = 0; a < L; ++a) {
                    float s = 0.0f;
                    for (int64_t b = 0; b < L; ++b) s += mu[b * L + a] * r[b];
                    h[a] = -s;
                }
            float* gq = grad_q_ + i * S;
            if (!is_matrix(kernel)) {
                const float w = kernel.weight[0];
                for (int64_t a = 0; a < L; ++a) gq[a] += w * h[a];
            } else {
                for (int64_t b = 0; b < L; ++b) {
                    float s = 0.0f;
                    for (int64_t a = 0; a < L; ++a) s += kernel.weight[a * L + b] * h[a];
                    gq[b] += s;
                }
            }
        }
    });
    // P = sum_i R_i Q_i^T: in full when a matrix needs it, else only its diagonal
    const bool full = is_matrix(kernel) || kind == DYNSEG_COMPAT_FULL;
    const int64_t width = full ? L * L : L;
    parallel_for(chunks, 1, threads_, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
            double* part = partial_ + c * width;
            std::fill(part, part + width, 0.0);
            const int64_t i1 = std::min(N, (c + 1) * reduce_chunk_);
            for (int64_t i = c * reduce_chunk_; i < i1; ++i) {
                const float* r = R + i * S;
                const float* q = Q + i * S;
                if (full) {
                    for (int64_t a = 0; a < L; ++a)
                        for (int64_t b = 0; b < L; ++b) part[a * L + b] += double(r[a]) * q[b];
                } else {
                    for (int64_t a = 0; a < L; ++a) part[a] += double(r[a]) * q[a];
                }
            }
        }
    });
    P.assign(width, 0.0);
    for (int64_t c = 0; c < chunks; ++c)
        for (int64_t j = 0; j < width; ++j) P[j] += partial_[c * width + j];
    add_parameter_gradients(kernel, P, dweight, dmu);
}

// With P = sum_i (Knorm^T G)_i Q_i^T:  dW_k = -mu^T P (its trace for a scalar weight) and
// dmu = -sum_k P W_k^T (only the diagonal for a diagonal mu). P holds L x L values, or only its diagonal
// when neither the weight nor mu is a full matrix (then only the diagonal is read).
void MeanField::add_parameter_gradients(const dynseg_kernel& kernel, const std::vector<double>& P,
                                        std::vector<double>& dweight, std::vector<double>& dmu) const {
    const int64_t L = labels_;
    const int kind = problem_.compat_kind;
    const float* mu = problem_.compat;
    const bool full = static_cast<int64_t>(P.size()) == L * L;
    auto entry = [&](int64_t a, int64_t b) -> double { return full ? P[a * L + b] : a == b ? P[a] : 0.0; };
    auto mu_at = [&](int64_t a, int64_t b) -> double {
        if (kind == DYNSEG_COMPAT_POTTS) return a == b ? -1.0 : 0.0;
        if (kind == DYNSEG_COMPAT_DIAGONAL) return a == b ? mu[a] : 0.0;
        return mu[a * L + b];
    };
    const bool mu_diagonal = kind != DYNSEG_COMPAT_FULL;
    if (!is_matrix(kernel)) {
        double s = 0.0;
        for (int64_t a = 0; a < L; ++a) {
            if (mu_diagonal) {
                s -= mu_at(a, a) * entry(a, a);
                continue;
            }
            for (int64_t b = 0; b < L; ++b) s -= mu_at(a, b) * entry(a, b);
        }
        dweight[0] += s;
    } else {
        for (int64_t a = 0; a < L; ++a)
            for (int64_t b = 0; b < L; ++b) {
                double s = 0.0;
                if (mu_diagonal)
                    s = -mu_at(a, a) * entry(a, b);
                else
                    for (int64_t c = 0; c < L; ++c) s -= mu_at(c, a) * entry(c, b);
                dweight[a * L + b] += s;
            }
    }
    if (kind == DYNSEG_COMPAT_POTTS) return;
    const bool diagonal = kind == DYNSEG_COMPAT_DIAGONAL;
    for (int64_t a = 0; a < L; ++a)
        for (int64_t b = diagonal ? a : 0; b < (diagonal ? a + 1 : L); ++b) {
            double s = 0.0;
            if (!is_matrix(kernel))
                s = kernel.weight[0] * entry(a, b);
            else
                for (int64_t c = 0; c < L; ++c) s += entry(a, c) * kernel.weight[b * L + c];
            if (kind == DYNSEG_COMPAT_FULL)
                dmu[a * L + b] -= s;
            else
                dmu[a] -= s;
        }
}

}  // namespace dynseg
