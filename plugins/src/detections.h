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

// The backward pass (both backends), in double: dLoss/dB_d of one belief.
struct BeliefGradient {
    double q0, q1;
};

// The pixel update's gradient, from the sums over F_d of the gradient G of the logits it added to:
// `all` of every label's, `own` of label l_d's. Returns the gradient of the belief the update read;
// adds the update's part of dLoss/dw_x to *grad_w_x.
DYNSEG_HOST_DEVICE inline BeliefGradient pixel_terms_backward(DetectionBelief belief, float score, float w_x,
                                                              double all, double own, double* grad_w_x) {
    const double x = double(w_x) * score;
    // everyone = -x Q(Y_d = 1) reaches every label, own = x (Q(Y_d = 1) - Q(Y_d = 0)) label l_d only
    *grad_w_x += score * ((double(belief.q1) - belief.q0) * own - belief.q1 * all);
    return {-x * own, x * (own - all)};
}

// The Y update's gradient, from the gradient of the belief it wrote (`belief`, made from the box sum
// `agree` = A_d over n_d = `pixels`). Returns dLoss/dA_d, which every pixel of F_d adds to its
// dLoss/dQ(l_d); adds the update's part of dLoss/dw_y to *grad_w_y.
DYNSEG_HOST_DEVICE inline double updated_belief_backward(DetectionBelief belief, BeliefGradient grad, float agree,
                                                         float pixels, float score, float w_y, double* grad_w_y) {
    const double dot = grad.q0 * belief.q0 + grad.q1 * belief.q1;
    const double grad_a0 = belief.q0 * (grad.q0 - dot), grad_a1 = belief.q1 * (grad.q1 - dot);  // the softmax's
    // a0 = (1 - p_d) - y_d A_d, a1 = p_d - y_d (n_d - A_d), y_d = w_y s_d / n_d
    const double y = double(w_y) * score / pixels;
    *grad_w_y -= (double(agree) * grad_a0 + (double(pixels) - agree) * grad_a1) * score / pixels;
    return y * (grad_a1 - grad_a0);
}

// Both backends' per-detection arrays in their workspace, laid out by one plan: D each but beliefs
// ((T + 1, D) with history, B^0 .. B^T; else D, updated in place) and agree ((T, D)). History, and every
// array from agree on, only for the backward pass.
struct DetectionScratch {
    BoxSpan* spans = nullptr;
    DetectionTerm* terms = nullptr;
    DetectionBelief* beliefs = nullptr;
    float* agree = nullptr;                   // A_d of each iteration
    BeliefGradient* grad_beliefs = nullptr;   // dLoss/dB_d of the belief the iteration being walked back wrote
    float* grad_agree = nullptr;              // dLoss/dA_d of that iteration
    double* grad_w_x = nullptr;               // per detection, summed over the iterations; then over d in order
    double* grad_w_y = nullptr;

    void plan(Workspace& ws, int64_t detections, int64_t iterations, bool history) {
        spans = ws.take<BoxSpan>(detections);
        terms = ws.take<DetectionTerm>(detections);
        beliefs = ws.take<DetectionBelief>(history ? (iterations + 1) * detections : detections);
        if (!history) return;
        agree = ws.take<float>(iterations * detections);
        grad_beliefs = ws.take<BeliefGradient>(detections);
        grad_agree = ws.take<float>(detections);
        grad_w_x = ws.take<double>(detections);
        grad_w_y = ws.take<double>(detections);
    }
};

class DetectionPotential {
public:
    // Lays out its per-detection scratch for `pass` (counting mode when ws has no memory).
    DetectionPotential(const dynseg_crf_problem& problem, int pass, Workspace& ws);

    bool active() const { return detections_ != nullptr; }
    // Before the first iteration: each belief <- its prior, recalibrated <- s_d (what T = 0 leaves).
    void start() const;
    // Iteration t's term (t = 0 first) from q = its starting Q, pixel-major (N, stride) as the logits are:
    // logits += the pixel terms of the beliefs; then each belief <- its Y update from q, written to
    // recalibrated.
    void add(int t, const float* q, float* logits, int64_t stride, int threads) const;

    // The backward pass, after a forward pass that kept its beliefs (pass = backward):
    // the gradient of the last beliefs from grad_recalibrated, and none yet for w_x and w_y.
    void start_backward() const;
    // Walks back iteration t: from grad_logits = dLoss/d its logits, adds the Y update's gradient to
    // grad_q = dLoss/d its starting Q (on l_d, over F_d) and the gradients of w_x and w_y, and moves the
    // belief gradient one iteration back.
    void backward(int t, const float* grad_logits, float* grad_q, int64_t stride, int threads) const;
    // Writes grad_detection_x and grad_detection_y (those wanted).
    void finish_backward() const;

private:
    DetectionBelief* belief(int t) const { return s_.beliefs + (history_ ? t * detections_->count : 0); }

    const dynseg_detections* detections_ = nullptr;
    int64_t num_labels_ = 0, height_ = 0, width_ = 0;
    bool history_ = false;  // backward: every iteration's beliefs and box sums are kept
    DetectionScratch s_;
};

}  // namespace dynseg
