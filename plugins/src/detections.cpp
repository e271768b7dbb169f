// detections.cpp: the detection potential's term on the CPU (see detections.h).
#include "detections.h"

#include <algorithm>

#include "parallel.h"

namespace dynseg {

DetectionPotential::DetectionPotential(const dynseg_crf_problem& problem, Workspace& ws) {
    if (!problem.detections || problem.detections->count == 0) return;
    detections_ = problem.detections;
    num_labels_ = problem.num_labels;
    height_ = problem.height;
    width_ = problem.width;
    spans_ = ws.take<BoxSpan>(detections_->count);
    terms_ = ws.take<DetectionTerm>(detections_->count);
    beliefs_ = ws.take<DetectionBelief>(detections_->count);
}

void DetectionPotential::start() const {
    if (!detections_) return;
    const float cap = prior_cap(detections_->epsilon);
    for (int64_t d = 0; d < detections_->count; ++d)
        beliefs_[d] = prior_belief(detection_prior(detections_->scores[d], detections_->score_ceiling, cap));
    if (detections_->recalibrated)
        std::copy(detections_->scores, detections_->scores + detections_->count, detections_->recalibrated);
}

void DetectionPotential::add(const float* q, float* logits, int64_t stride, int threads) const {
    if (!detections_) return;
    const int64_t D = detections_->count, L = num_labels_, W = width_;
    const float w_x = *detections_->detection_x, w_y = *detections_->detection_y;
    const float cap = prior_cap(detections_->epsilon);
    // A_d in double, row by row: a fixed order whatever the thread count
    parallel_for(D, 1, threads, [&](int64_t begin, int64_t end) {
        for (int64_t d = begin; d < end; ++d) {
            const BoxSpan s = box_span(detections_->boxes + 4 * d, height_, W);
            const int64_t label = detections_->labels[d];
            double agree = 0.0;
            for (int64_t y = s.first_y; y <= s.last_y; ++y)
                for (int64_t x = s.first_x; x <= s.last_x; ++x) agree += q[(y * W + x) * stride + label];
            const float score = detections_->scores[d];
            spans_[d] = s;
            terms_[d] = pixel_terms(beliefs_[d], score, w_x);
            beliefs_[d] = updated_belief(static_cast<float>(agree), static_cast<float>(s.count()), score, w_y,
                                         detection_prior(score, detections_->score_ceiling, cap));
            if (detections_->recalibrated) detections_->recalibrated[d] = beliefs_[d].q1;
        }
    });
    // Rows are independent; within a pixel the detections add in index order.
    parallel_for(height_, 1, threads, [&](int64_t begin, int64_t end) {
        for (int64_t y = begin; y < end; ++y) {
            for (int64_t d = 0; d < D; ++d) {
                const BoxSpan& s = spans_[d];
                if (y < s.first_y || y > s.last_y) continue;
                const float everyone = terms_[d].everyone, own = terms_[d].own;
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

}  // namespace dynseg
