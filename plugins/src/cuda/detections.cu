// detections.cu: the detection potential's kernels (see detections.cuh).
#include "detections.cuh"

namespace dynseg {
namespace cuda {
namespace {

// One block per detection. A label outside 0..L-1, a negative score or a box without a pixel cannot be
// refused before the call: its terms become NaN, its score, and the logits inside its box if it has
// any (the CUDA calls' rule for bad device data), which finish_scores notes for dynseg_crf_check_cuda.
__global__ void box_terms(const float* q, int64_t stride, int64_t labels, int64_t height, int64_t width,
                          const float* boxes, const int64_t* class_ids, const float* scores, const float* w_x,
                          const float* w_y, float score_ceiling, float prior_cap, BoxSpan* spans,
                          DetectionTerm* terms, DetectionBelief* beliefs, float* recalibrated) {
    __shared__ double partial[kThreads];
    const int64_t d = blockIdx.x;
    const int64_t label = class_ids[d];
    const BoxSpan span = box_span(boxes + 4 * d, height, width);
    const int64_t box_width = span.last_x - span.first_x + 1, count = span.count();
    const bool valid = label >= 0 && label < labels && count > 0 && scores[d] >= 0.0f;
    double sum = 0.0;
    if (valid)
        for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
            const int64_t pixel = (span.first_y + k / box_width) * width + span.first_x + k % box_width;
            sum += q[pixel * stride + label];
        }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x != 0) return;
    const float score = scores[d], nan = __int_as_float(0x7fc00000);
    DetectionTerm term = pixel_terms(beliefs[d], score, *w_x);
    DetectionBelief belief = updated_belief(static_cast<float>(partial[0]), static_cast<float>(count), score, *w_y,
                                            detection_prior(score, score_ceiling, prior_cap));
    if (!valid) {
        term = {nan, nan};
        belief = {nan, nan};
    }
    spans[d] = span;
    terms[d] = term;
    beliefs[d] = belief;
    if (recalibrated) recalibrated[d] = belief.q1;
}

__global__ void prior_beliefs(const float* scores, int64_t count, float score_ceiling, float prior_cap,
                              DetectionBelief* beliefs) {
    DYNSEG_FOR_EACH(d, count) beliefs[d] = prior_belief(detection_prior(scores[d], score_ceiling, prior_cap));
}

__global__ void add_terms(float* logits, int64_t stride, int64_t labels, int64_t height, int64_t width,
                          const BoxSpan* spans, const int64_t* class_ids, const DetectionTerm* terms,
                          int64_t detections) {
    DYNSEG_FOR_EACH(i, height * width * labels) {
        const uint32_t pixel = i / uint32_t(labels), l = i % uint32_t(labels);
        const int64_t x = pixel % uint32_t(width), y = pixel / uint32_t(width);
        float value = logits[int64_t(pixel) * stride + l];
        for (int64_t d = 0; d < detections; ++d) {
            if (!spans[d].holds(x, y)) continue;
            value += terms[d].everyone;
            if (class_ids[d] == l) value += terms[d].own;
        }
        logits[int64_t(pixel) * stride + l] = value;
    }
}

// Q(Y_d = 1) at the end of a call: NaN where a lattice could not be built, as the logits are; else
// checked as the logits are.
__global__ void finish_scores(float* recalibrated, int64_t count, Status* status) {
    const bool failed = status->code != 0;
    DYNSEG_FOR_EACH(i, count) {
        if (failed)
            recalibrated[i] = __int_as_float(0x7fc00000);
        else
            note_if_nonfinite(status, recalibrated[i]);
    }
}

}  // namespace

DetectionPotential::DetectionPotential(const dynseg_crf_problem& problem, Workspace& ws) {
    if (!problem.detections || problem.detections->count == 0) return;
    detections_ = problem.detections;
    num_labels_ = problem.num_labels;
    height_ = problem.height;
    width_ = problem.width;
    prior_cap_ = prior_cap(detections_->epsilon);
    spans_ = ws.take<BoxSpan>(detections_->count);
    terms_ = ws.take<DetectionTerm>(detections_->count);
    beliefs_ = ws.take<DetectionBelief>(detections_->count);
}

void DetectionPotential::start(const Launch& launch) const {
    if (!detections_) return;
    prior_beliefs<<<launch.blocks(detections_->count), kThreads, 0, launch.stream>>>(
        detections_->scores, detections_->count, detections_->score_ceiling, prior_cap_, beliefs_);
    if (detections_->recalibrated)
        cudaMemcpyAsync(detections_->recalibrated, detections_->scores, detections_->count * sizeof(float),
                        cudaMemcpyDeviceToDevice, launch.stream);
}

void DetectionPotential::finish(Status* status, const Launch& launch) const {
    if (!detections_ || !detections_->recalibrated) return;
    finish_scores<<<launch.blocks(detections_->count), kThreads, 0, launch.stream>>>(detections_->recalibrated,
                                                                                     detections_->count, status);
}

void DetectionPotential::add(const float* q, float* logits, int64_t stride, const Launch& launch) const {
    if (!detections_) return;
    box_terms<<<static_cast<unsigned>(detections_->count), kThreads, 0, launch.stream>>>(
        q, stride, num_labels_, height_, width_, detections_->boxes, detections_->labels, detections_->scores,
        detections_->detection_x, detections_->detection_y, detections_->score_ceiling, prior_cap_, spans_, terms_,
        beliefs_, detections_->recalibrated);
    add_terms<<<launch.blocks(height_ * width_ * num_labels_), kThreads, 0, launch.stream>>>(
        logits, stride, num_labels_, height_, width_, spans_, detections_->labels, terms_, detections_->count);
}

}  // namespace cuda
}  // namespace dynseg
