// detections.cuh: the detection potential (dynseg_detections in dynseg_crf.h) on the GPU, the twin of
// plugins/src/detections.cpp: after each iteration's pairwise message, the pixel terms of the beliefs
// Q(Y_d) the previous iteration left, then the Y update from Q^{t-1}.
//
// Two launches per iteration: one block per detection sums Q(l_d) over its box (in double, a fixed
// tree, so the bits repeat), takes its terms from its belief and then updates the belief (and
// Q(Y_d = 1)); then a thread per pixel and label adds the terms of the boxes holding the pixel, in
// detection order. No atomics, no allocation.
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
    DetectionPotential(const dynseg_crf_problem& problem, Workspace& ws);

    bool active() const { return detections_ != nullptr; }
    // Before the first iteration: each belief <- its prior, recalibrated <- s_d (what T = 0 leaves).
    void start(const Launch& launch) const;
    // One iteration's term from q = Q^{t-1}, pixel-major (N, stride) as the logits are: logits += the
    // pixel terms of the beliefs; then each belief <- its Y update from q, written to recalibrated.
    void add(const float* q, float* logits, int64_t stride, const Launch& launch) const;
    // Q(Y_d = 1) <- NaN when status says a lattice failed (the logits are NaN then too); else notes in
    // status a score that is not finite.
    void finish(Status* status, const Launch& launch) const;

private:
    const dynseg_detections* detections_ = nullptr;
    int64_t num_labels_ = 0, height_ = 0, width_ = 0;
    float prior_cap_ = 1.0f;
    BoxSpan* spans_ = nullptr;  // device arrays, (D,) each
    DetectionTerm* terms_ = nullptr;
    DetectionBelief* beliefs_ = nullptr;
};

}  // namespace cuda
}  // namespace dynseg
