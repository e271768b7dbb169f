// detections.h: the higher-order detection potential (dynseg_detections in dynseg_crf.h) on the CPU,
// and the rule both backends use to turn a box into pixels.
//
// meanfield.cpp adds the detections' term to the logits after each iteration's pairwise message; the
// CUDA twin is cuda/detections.cu. As in the authors' released code, iteration t's pixel update reads
// the belief Q(Y_d) that iteration t-1 left (the prior (1 - p_d, p_d) before the first), and its Y
// update turns Q^{t-1} into the belief iteration t+1 reads. Both backends add the detections' terms to
// a pixel in index order, so they agree to the rounding of the box sums A_d (summed in double on both).
#pragma once

#include <cmath>
#include <cstdint>

#include "dynseg_crf.h"
#include "workspace.h"

#if defined(__CUDACC__)
#define DYNSEG_HOST_DEVICE __host__ __device__
#else
#define DYNSEG_HOST_DEVICE
#endif

namespace dynseg {

// The pixels of a box: columns first_x..last_x and rows first_y..last_y, inclusive, clipped to the
// image. The box's float corners compare with the pixel indices as the reference's mask does
// (x1 <= x <= x2), so integer-valued boxes keep exactly their pixels. Empty (count() == 0) when no
// pixel is inside.
struct BoxSpan {
    int64_t first_x = 0, last_x = -1, first_y = 0, last_y = -1;

    DYNSEG_HOST_DEVICE int64_t count() const {
        return (last_x >= first_x && last_y >= first_y) ? (last_x - first_x + 1) * (last_y - first_y + 1) : 0;
    }
    DYNSEG_HOST_DEVICE bool holds(int64_t x, int64_t y) const {
        return x >= first_x && x <= last_x && y >= first_y && y <= last_y;
    }
};

DYNSEG_HOST_DEVICE inline BoxSpan box_span(const float* box, int64_t height, int64_t width) {
    BoxSpan s;
    // In double: float(width - 1) rounds up to width beyond 2^24, which would reach one pixel past a row.
    const double left = box[0], top = box[1], right = box[2], bottom = box[3];
    const double last_column = double(width - 1), last_row = double(height - 1);
    // written so that NaN corners fail every comparison and leave the span empty
    if (!(left <= right && top <= bottom && right >= 0.0 && bottom >= 0.0 && left <= last_column &&
          top <= last_row))
        return s;
    s.first_x = static_cast<int64_t>(ceil(fmax(left, 0.0)));
    s.first_y = static_cast<int64_t>(ceil(fmax(top, 0.0)));
    s.last_x = static_cast<int64_t>(floor(fmin(right, last_column)));
    s.last_y = static_cast<int64_t>(floor(fmin(bottom, last_row)));
    return s;
}

// The belief in detection d: Q(Y_d = 0), "the detection is wrong", and Q(Y_d = 1). The float operations
// below are in the order of the reference's (trainer/model/semantic_crf.py, docs/ops.md).
struct DetectionBelief {
    float q0, q1;
};

// p_d = min(s_d / s_max, 1 - epsilon): the Y update's prior, and the belief (1 - p_d, p_d) before the
// first iteration.
DYNSEG_HOST_DEVICE inline float detection_prior(float score, float score_ceiling, float cap) {
    return fminf(score / score_ceiling, cap);
}

DYNSEG_HOST_DEVICE inline DetectionBelief prior_belief(float prior) { return {1.0f - prior, prior}; }

// The Y update from the box sum A_d of Q^{t-1}(l_d): the softmax of a0 = (1 - p_d) - y_d A_d and
// a1 = p_d - y_d (n_d - A_d), y_d = w_y s_d / n_d.
DYNSEG_HOST_DEVICE inline DetectionBelief updated_belief(float agree, float pixels, float score, float w_y,
                                                         float prior) {
    const float y = w_y * score / pixels;
    const float a0 = (1.0f - prior) - y * agree;
    const float a1 = prior - y * (pixels - agree);
    const float top = fmaxf(a0, a1);
    const float e0 = expf(a0 - top), e1 = expf(a1 - top);
    return {e0 / (e0 + e1), e1 / (e0 + e1)};
}

// The pixel update's two terms on F_d from the belief the iteration starts with: `everyone`,
// -x_d Q(Y_d = 1), for every label, and `own`, x_d (Q(Y_d = 1) - Q(Y_d = 0)), added to l_d; x_d = w_x s_d.
struct DetectionTerm {
    float everyone, own;
};

DYNSEG_HOST_DEVICE inline DetectionTerm pixel_terms(DetectionBelief belief, float score, float w_x) {
    const float x = w_x * score;
    return {-(x * belief.q1), x * (belief.q1 - belief.q0)};
}

// 1 - epsilon rounded once to float, as the reference computes the prior's cap.
inline float prior_cap(float epsilon) { return static_cast<float>(1.0 - static_cast<double>(epsilon)); }

class DetectionPotential {
public:
    // Lays out its per-detection scratch (counting mode when ws has no memory).
    DetectionPotential(const dynseg_crf_problem& problem, Workspace& ws);

    bool active() const { return detections_ != nullptr; }
    // Before the first iteration: each belief <- its prior, recalibrated <- s_d (what T = 0 leaves).
    void start() const;
    // One iteration's term from q = Q^{t-1}, pixel-major (N, stride) as the logits are: logits += the
    // pixel terms of the beliefs; then each belief <- its Y update from q, written to recalibrated.
    void add(const float* q, float* logits, int64_t stride, int threads) const;

private:
    const dynseg_detections* detections_ = nullptr;
    int64_t num_labels_ = 0, height_ = 0, width_ = 0;
    BoxSpan* spans_ = nullptr;
    DetectionTerm* terms_ = nullptr;
    DetectionBelief* beliefs_ = nullptr;
};

}  // namespace dynseg
