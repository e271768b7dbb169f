// detections.h: the higher-order detection potential (dynseg_detections in dynseg_crf.h) on the CPU,
// and the rule both backends use to turn a box into pixels.
//
// meanfield.cpp adds D(Q^{t-1}) to the logits after each iteration's pairwise message; the CUDA twin
// is cuda/detections.cu. Both add the detections' terms to a pixel in index order, so they agree to
// the rounding of the box sums A_d (summed in double on both).
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

// Q(Y_d = 1) and the two per-pixel terms of one detection from its box sum A_d (float operations in
// the order of the reference, docs/ops.md): `everyone` for every label, `own` added to l_d.
struct DetectionTerm {
    float everyone, own, recalibrated;
};

DYNSEG_HOST_DEVICE inline DetectionTerm detection_term(float agree, float pixels, float score, float w_x, float w_y,
                                                       float score_ceiling, float prior_cap) {
    const float prior = fminf(score / score_ceiling, prior_cap);
    const float y = w_y * score / pixels;
    const float a0 = (1.0f - prior) - y * agree;
    const float a1 = prior - y * (pixels - agree);
    const float top = fmaxf(a0, a1);
    const float e0 = expf(a0 - top), e1 = expf(a1 - top);
    const float q0 = e0 / (e0 + e1), q1 = e1 / (e0 + e1);
    const float x = w_x * score;
    return {-(x * q1), x * (q1 - q0), q1};
}

// 1 - epsilon rounded once to float, as the reference computes the prior's cap.
inline float prior_cap(float epsilon) { return static_cast<float>(1.0 - static_cast<double>(epsilon)); }

class DetectionPotential {
public:
    // Lays out its per-detection scratch (counting mode when ws has no memory).
    DetectionPotential(const dynseg_crf_problem& problem, Workspace& ws);

    bool active() const { return d_ != nullptr; }
    // recalibrated <- s_d: what T = 0 iterations leave.
    void start() const;
    // logits <- logits + D(q); q and logits are pixel-major (N, stride). Writes Q(Y_d = 1).
    void add(const float* q, float* logits, int64_t stride, int threads) const;

private:
    const dynseg_detections* d_ = nullptr;
    int64_t labels_ = 0, height_ = 0, width_ = 0;
    BoxSpan* spans_ = nullptr;
    DetectionTerm* terms_ = nullptr;
};

}  // namespace dynseg
