// detections.cuh: the detection potential (dynseg_detections in dynseg_crf.h) on the GPU, the twin of
// plugins/src/detections.cpp: after each iteration's pairwise message, the pixel terms of the beliefs
// Q(Y_d) the previous iteration left, then the Y update from Q^{t-1}.
//
// Two launches per iteration: one block per detection sums Q(l_d) over its box (in double, a fixed
// tree, so the bits repeat), takes its terms from its belief and then updates the belief (and
// Q(Y_d = 1)); then a thread per pixel and label adds the terms of the boxes holding the pixel, in
// detection order. The backward pass mirrors them: a block per detection sums the logits' gradient over
// its box and walks its belief back, then a thread per pixel adds the boxes' dLoss/dA_d to dLoss/dQ(l_d).
// No atomics, no allocation.
#pragma once

#include <cstdint>

#include "../detections.h"
#include "../workspace.h"
#include "common.cuh"
#include "dynseg_crf.h"

namespace dynseg {
namespace cuda {

class DetectionPotential {
public:
    DetectionPotential(const dynseg_crf_problem& problem, int pass, Workspace& ws);

    bool active() const { return detections_ != nullptr; }
    // Before the first iteration: each belief <- its prior, recalibrated <- s_d (what T = 0 leaves).
    void start(const Launch& launch) const;
    // Iteration t's term (t = 0 first) from q = its starting Q, pixel-major (N, stride) as the logits are:
    // logits += the pixel terms of the beliefs; then each belief <- its Y update from q, written to
    // recalibrated.
    void add(int t, const float* q, float* logits, int64_t stride, const Launch& launch) const;
    // Q(Y_d = 1) <- NaN when status says a lattice failed (the logits are NaN then too); else notes in
    // status a score that is not finite.
    void finish(Status* status, const Launch& launch) const;

    // The backward pass, as the CPU's (plugins/src/detections.h), after a forward pass with pass = backward.
    void start_backward(const Launch& launch) const;
    void backward(int t, const float* grad_logits, float* grad_q, int64_t stride, const Launch& launch) const;
    // Writes grad_detection_x and grad_detection_y (those wanted), NaN where a lattice failed.
    void finish_backward(Status* status, const Launch& launch) const;

private:
    DetectionBelief* belief(int t) const { return s_.beliefs + (history_ ? t * detections_->count : 0); }

    const dynseg_detections* detections_ = nullptr;
    int64_t num_labels_ = 0, height_ = 0, width_ = 0;
    float prior_cap_ = 1.0f;
    bool history_ = false;  // backward: every iteration's beliefs and box sums are kept
    DetectionScratch s_;    // device arrays
};

}  // namespace cuda
}  // namespace dynseg
