// detections.cpp: the detection potential's term on the CPU, and its gradient (see detections.h).
#include "detections.h"

#include <algorithm>

#include "parallel.h"

namespace dynseg {

DetectionPotential::DetectionPotential(const dynseg_crf_problem& problem, int pass, Workspace& ws) {
    if (!problem.detections || problem.detections->count == 0) return;
    detections_ = problem.detections;
    num_labels_ = problem.num_labels;
    height_ = problem.height;
    width_ = problem.width;
    history_ = pass == DYNSEG_PASS_BACKWARD;
    s_.plan(ws, detections_->count, problem.iterations, history_);
}

void DetectionPotential::start() const {
    if (!detections_) return;
    const float cap = prior_cap(detections_->epsilon);
    DetectionBelief* first = belief(0);
    for (int64_t d = 0; d < detections_->count; ++d)
        first[d] = prior_belief(detection_prior(detections_->scores[d], detections_->score_ceiling, cap));
    if (detections_->recalibrated)
        std::copy(detections_->scores, detections_->scores + detections_->count, detections_->recalibrated);
}

void DetectionPotential::add(int t, const float* q, float* logits, int64_t stride, int threads) const {
    if (!detections_) return;
    const int64_t D = detections_->count, L = num_labels_, W = width_;
    const float w_x = *detections_->detection_x, w_y = *detections_->detection_y;
    const float cap = prior_cap(detections_->epsilon);
    const DetectionBelief* read = belief(t);
    DetectionBelief* written = belief(t + 1);  // the same array without history: each d reads, then writes
    // A_d in double, row by row: a fixed order whatever the thread count
    parallel_for(D, 1, threads, [&](int64_t begin, int64_t end) {
        for (int64_t d = begin; d < end; ++d) {
            const BoxSpan s = box_span(detections_->boxes + 4 * d, height_, W);
            const int64_t label = detections_->labels[d];
            double agree = 0.0;
            for (int64_t y = s.first_y; y <= s.last_y; ++y)
                for (int64_t x = s.first_x; x <= s.last_x; ++x) agree += q[(y * W + x) * stride + label];
            const float score = detections_->scores[d];
            s_.spans[d] = s;
            s_.terms[d] = pixel_terms(read[d], score, w_x);
            written[d] = updated_belief(static_cast<float>(agree), static_cast<float>(s.count()), score, w_y,
                                        detection_prior(score, detections_->score_ceiling, cap));
            if (s_.agree) s_.agree[t * D + d] = static_cast<float>(agree);
            if (detections_->recalibrated) detections_->recalibrated[d] = written[d].q1;
        }
    });
    // Rows are independent; within a pixel the detections add in index order.
    parallel_for(height_, 1, threads, [&](int64_t begin, int64_t end) {
        for (int64_t y = begin; y < end; ++y) {
            for (int64_t d = 0; d < D; ++d) {
                const BoxSpan& s = s_.spans[d];
                if (y < s.first_y || y > s.last_y) continue;
                const float everyone = s_.terms[d].everyone, own = s_.terms[d].own;
                const int64_t label = detections_->labels[d];
                for (int64_t x = s.first_x; x <= s.last_x; ++x) {
                    float* row = logits + (y * W + x) * stride;
                    for (int64_t l = 0; l < L; ++l) row[l] += everyone;
                    row[label] += own;
                }
            }
        }
    });
}

void DetectionPotential::start_backward() const {
    if (!detections_) return;
    const float* grad = detections_->grad_recalibrated;
    for (int64_t d = 0; d < detections_->count; ++d) {
        s_.grad_beliefs[d] = {0.0, grad ? double(grad[d]) : 0.0};
        s_.grad_w_x[d] = s_.grad_w_y[d] = 0.0;
    }
}

void DetectionPotential::backward(int t, const float* grad_logits, float* grad_q, int64_t stride,
                                  int threads) const {
    if (!detections_) return;
    const int64_t D = detections_->count, L = num_labels_, W = width_;
    const float w_x = *detections_->detection_x, w_y = *detections_->detection_y;
    const DetectionBelief* read = belief(t);
    const DetectionBelief* written = belief(t + 1);
    parallel_for(D, 1, threads, [&](int64_t begin, int64_t end) {
        for (int64_t d = begin; d < end; ++d) {
            const BoxSpan& s = s_.spans[d];  // as every iteration of the forward pass left them
            const int64_t label = detections_->labels[d];
            const float score = detections_->scores[d];
            // the Y update wrote belief t + 1, whose gradient is complete: iteration t + 1 (walked back
            // already) and grad_recalibrated are all that read it
            s_.grad_agree[d] = static_cast<float>(updated_belief_backward(
                written[d], s_.grad_beliefs[d], s_.agree[t * D + d], static_cast<float>(s.count()), score, w_y,
                &s_.grad_w_y[d]));
            double all = 0.0, own = 0.0;
            for (int64_t y = s.first_y; y <= s.last_y; ++y)
                for (int64_t x = s.first_x; x <= s.last_x; ++x) {
                    const float* row = grad_logits + (y * W + x) * stride;
                    for (int64_t l = 0; l < L; ++l) all += row[l];
                    own += row[label];
                }
            s_.grad_beliefs[d] = pixel_terms_backward(read[d], score, w_x, all, own, &s_.grad_w_x[d]);
        }
    });
    parallel_for(height_, 1, threads, [&](int64_t begin, int64_t end) {
        for (int64_t y = begin; y < end; ++y)
            for (int64_t d = 0; d < D; ++d) {
                const BoxSpan& s = s_.spans[d];
                if (y < s.first_y || y > s.last_y) continue;
                const int64_t label = detections_->labels[d];
                const float grad_agree = s_.grad_agree[d];
                for (int64_t x = s.first_x; x <= s.last_x; ++x) grad_q[(y * W + x) * stride + label] += grad_agree;
            }
    });
}

void DetectionPotential::finish_backward() const {
    if (!detections_) return;
    double w_x = 0.0, w_y = 0.0;
    for (int64_t d = 0; d < detections_->count; ++d) {
        w_x += s_.grad_w_x[d];
        w_y += s_.grad_w_y[d];
    }
    if (detections_->grad_detection_x) *detections_->grad_detection_x = static_cast<float>(w_x);
    if (detections_->grad_detection_y) *detections_->grad_detection_y = static_cast<float>(w_y);
}

}  // namespace dynseg
