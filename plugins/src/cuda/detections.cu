// detections.cu: the detection potential's kernels, forward and backward (see detections.cuh).
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
                          DetectionTerm* terms, const DetectionBelief* read, DetectionBelief* written, float* agree,
                          float* recalibrated) {
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
    DetectionTerm term = pixel_terms(read[d], score, *w_x);
    DetectionBelief belief = updated_belief(static_cast<float>(partial[0]), static_cast<float>(count), score, *w_y,
                                            detection_prior(score, score_ceiling, prior_cap));
    if (!valid) {
        term = {nan, nan};
        belief = {nan, nan};
    }
    spans[d] = span;
    terms[d] = term;
    written[d] = belief;  // read[d] itself without history: this thread alone reads and writes it
    if (agree) agree[d] = static_cast<float>(partial[0]);
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

// The gradients of the last beliefs from grad_recalibrated (NULL: zero); none yet for w_x and w_y.
__global__ void start_gradients(const float* grad_recalibrated, int64_t count, BeliefGradient* grad_beliefs,
                                double* grad_w_x, double* grad_w_y) {
    DYNSEG_FOR_EACH(d, count) {
        grad_beliefs[d] = {0.0, grad_recalibrated ? double(grad_recalibrated[d]) : 0.0};
        grad_w_x[d] = grad_w_y[d] = 0.0;
    }
}

// One block per detection walks iteration t back: the Y update's gradient from the belief it wrote
// (dLoss/dA_d into grad_agree), then the sums over the box of the logits' gradient (in double, a fixed
// tree) and from them the pixel update's gradient of the belief it read. A detection box_terms made
// NaN (a bad label, score or box) makes its gradients NaN.
__global__ void box_gradients(const float* grad_logits, int64_t stride, int64_t labels, const BoxSpan* spans,
                              const int64_t* class_ids, const float* scores, const float* w_x, const float* w_y,
                              const DetectionBelief* read, const DetectionBelief* written, const float* agree,
                              BeliefGradient* grad_beliefs, float* grad_agree, double* grad_w_x, double* grad_w_y,
                              int64_t width) {
    __shared__ double all_partial[kThreads], own_partial[kThreads];
    const int64_t d = blockIdx.x;
    const int64_t label = class_ids[d];
    const BoxSpan span = spans[d];
    const int64_t box_width = span.last_x - span.first_x + 1, count = span.count();
    const bool valid = label >= 0 && label < labels && count > 0 && scores[d] >= 0.0f;
    double all = 0.0, own = 0.0;
    if (valid)
        for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
            const float* row = grad_logits + ((span.first_y + k / box_width) * width + span.first_x + k % box_width) *
                                                 stride;
            for (int64_t l = 0; l < labels; ++l) all += row[l];
            own += row[label];
        }
    all_partial[threadIdx.x] = all;
    own_partial[threadIdx.x] = own;
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) {
            all_partial[threadIdx.x] += all_partial[threadIdx.x + half];
            own_partial[threadIdx.x] += own_partial[threadIdx.x + half];
        }
        __syncthreads();
    }
    if (threadIdx.x != 0) return;
    const float score = scores[d];
    if (!valid) {
        const double nan = __int_as_float(0x7fc00000);
        grad_agree[d] = __int_as_float(0x7fc00000);
        grad_beliefs[d] = {nan, nan};
        grad_w_x[d] = grad_w_y[d] = nan;
        return;
    }
    grad_agree[d] = static_cast<float>(updated_belief_backward(written[d], grad_beliefs[d], agree[d],
                                                               static_cast<float>(count), score, *w_y, &grad_w_y[d]));
    grad_beliefs[d] = pixel_terms_backward(read[d], score, *w_x, all_partial[0], own_partial[0], &grad_w_x[d]);
}

// dLoss/dQ(l_d) += dLoss/dA_d on every pixel of F_d, a thread per pixel adding the boxes in detection order.
__global__ void add_box_gradients(float* grad_q, int64_t stride, int64_t labels, int64_t height, int64_t width,
                                  const BoxSpan* spans, const int64_t* class_ids, const float* grad_agree,
                                  int64_t detections) {
    DYNSEG_FOR_EACH(pixel, height * width) {
        const int64_t x = pixel % uint32_t(width), y = pixel / uint32_t(width);
        for (int64_t d = 0; d < detections; ++d) {
            const int64_t label = class_ids[d];
            if (spans[d].holds(x, y) && label >= 0 && label < labels) grad_q[pixel * stride + label] += grad_agree[d];
        }
    }
}

// dLoss/dw_x and dLoss/dw_y: the detections' parts added in index order by one thread; NaN where a
// lattice failed, else checked as the other gradients are.
__global__ void finish_gradients(const double* grad_w_x, const double* grad_w_y, int64_t count, float* out_x,
                                 float* out_y, Status* status) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const bool failed = status->code != 0;
    double x = 0.0, y = 0.0;
    for (int64_t d = 0; d < count; ++d) {
        x += grad_w_x[d];
        y += grad_w_y[d];
    }
    const float nan = __int_as_float(0x7fc00000);
    if (out_x) {
        *out_x = failed ? nan : static_cast<float>(x);
        if (!failed) note_if_nonfinite(status, *out_x);
    }
    if (out_y) {
        *out_y = failed ? nan : static_cast<float>(y);
        if (!failed) note_if_nonfinite(status, *out_y);
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

DetectionPotential::DetectionPotential(const dynseg_crf_problem& problem, int pass, Workspace& ws) {
    if (!problem.detections || problem.detections->count == 0) return;
    detections_ = problem.detections;
    num_labels_ = problem.num_labels;
    height_ = problem.height;
    width_ = problem.width;
    prior_cap_ = prior_cap(detections_->epsilon);
    history_ = pass == DYNSEG_PASS_BACKWARD;
    s_.plan(ws, detections_->count, problem.iterations, history_);
}

void DetectionPotential::start(const Launch& launch) const {
    if (!detections_) return;
    prior_beliefs<<<launch.blocks(detections_->count), kThreads, 0, launch.stream>>>(
        detections_->scores, detections_->count, detections_->score_ceiling, prior_cap_, belief(0));
    if (detections_->recalibrated)
        cudaMemcpyAsync(detections_->recalibrated, detections_->scores, detections_->count * sizeof(float),
                        cudaMemcpyDeviceToDevice, launch.stream);
}

void DetectionPotential::finish(Status* status, const Launch& launch) const {
    if (!detections_ || !detections_->recalibrated) return;
    finish_scores<<<launch.blocks(detections_->count), kThreads, 0, launch.stream>>>(detections_->recalibrated,
                                                                                     detections_->count, status);
}

void DetectionPotential::add(int t, const float* q, float* logits, int64_t stride, const Launch& launch) const {
    if (!detections_) return;
    box_terms<<<static_cast<unsigned>(detections_->count), kThreads, 0, launch.stream>>>(
        q, stride, num_labels_, height_, width_, detections_->boxes, detections_->labels, detections_->scores,
        detections_->detection_x, detections_->detection_y, detections_->score_ceiling, prior_cap_, s_.spans,
        s_.terms, belief(t), belief(t + 1), s_.agree ? s_.agree + t * detections_->count : nullptr,
        detections_->recalibrated);
    add_terms<<<launch.blocks(height_ * width_ * num_labels_), kThreads, 0, launch.stream>>>(
        logits, stride, num_labels_, height_, width_, s_.spans, detections_->labels, s_.terms, detections_->count);
}

void DetectionPotential::start_backward(const Launch& launch) const {
    if (!detections_) return;
    start_gradients<<<launch.blocks(detections_->count), kThreads, 0, launch.stream>>>(
        detections_->grad_recalibrated, detections_->count, s_.grad_beliefs, s_.grad_w_x, s_.grad_w_y);
}

void DetectionPotential::backward(int t, const float* grad_logits, float* grad_q, int64_t stride,
                                  const Launch& launch) const {
    if (!detections_) return;
    const int64_t D = detections_->count;
    box_gradients<<<static_cast<unsigned>(D), kThreads, 0, launch.stream>>>(
        grad_logits, stride, num_labels_, s_.spans, detections_->labels, detections_->scores,
        detections_->detection_x, detections_->detection_y, belief(t), belief(t + 1), s_.agree + t * D,
        s_.grad_beliefs, s_.grad_agree, s_.grad_w_x, s_.grad_w_y, width_);
    add_box_gradients<<<launch.blocks(height_ * width_), kThreads, 0, launch.stream>>>(
        grad_q, stride, num_labels_, height_, width_, s_.spans, detections_->labels, s_.grad_agree, D);
}

void DetectionPotential::finish_backward(Status* status, const Launch& launch) const {
    if (!detections_ || !(detections_->grad_detection_x || detections_->grad_detection_y)) return;
    finish_gradients<<<1, kThreads, 0, launch.stream>>>(s_.grad_w_x, s_.grad_w_y, detections_->count,
                                                 detections_->grad_detection_x, detections_->grad_detection_y, status);
}

}  // namespace cuda
}  // namespace dynseg
