// The detection potential's kernels (see detection_potential.cuh). Compiled with --fmad=false like the
// kernel library, so every product and sum rounds as the numpy reference (sdk/crf_node.py) writes it.
#include "detection_potential.cuh"

#include <algorithm>
#include <cmath>

namespace dynseg {
namespace tensorrt {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;

int blocks_for(int64_t items) {
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, kMaxBlocks)));
}

__device__ __forceinline__ bool inside(const float* box, float x, float y) {
    return x >= box[0] && x <= box[2] && y >= box[1] && y <= box[3];
}

__global__ void softmax_stats_kernel(const float* __restrict__ logits, int64_t labels, int64_t pixels,
                                     float* __restrict__ row_max, float* __restrict__ row_sum) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < pixels; i += int64_t(gridDim.x) * blockDim.x) {
        float m = logits[i];
        for (int64_t l = 1; l < labels; ++l) m = fmaxf(m, logits[l * pixels + i]);
        float s = 0.0f;
        for (int64_t l = 0; l < labels; ++l) s += expf(logits[l * pixels + i] - m);  // label order
        row_max[i] = m;
        row_sum[i] = s;
    }
}

// One block per detection: the sum of Q(l_d) over the box's pixels, each thread over a fixed stride of the
// box's row-major pixels, then a fixed tree over the threads; thread 0 finishes the 2-way softmax.
__global__ void box_terms_kernel(const float* __restrict__ logits, const float* __restrict__ row_max,
                                 const float* __restrict__ row_sum, int64_t labels, int64_t height, int64_t width,
                                 const float* __restrict__ boxes, const int64_t* __restrict__ class_ids,
                                 const float* __restrict__ scores, const float* __restrict__ detection_x,
                                 const float* __restrict__ detection_y, DetectionConstants constants,
                                 float* __restrict__ everyone, float* __restrict__ own,
                                 int32_t* __restrict__ label_index, float* __restrict__ detection_scores) {
    __shared__ float partial[kThreads];
    const int64_t d = blockIdx.x;
    const int64_t label = class_ids[d];
    const bool valid_label = label >= 0 && label < labels;
    const float* box = boxes + 4 * d;
    // The pixels x1 <= x <= x2, y1 <= y <= y2 (float comparisons, as the reference's mask), clipped.
    const float x1 = box[0], y1 = box[1], x2 = box[2], y2 = box[3];
    int64_t x_lo = 0, x_hi = -1, y_lo = 0, y_hi = -1;
    if (x1 <= x2 && y1 <= y2 && x2 >= 0.0f && y2 >= 0.0f && x1 <= float(width - 1) && y1 <= float(height - 1)) {
        x_lo = static_cast<int64_t>(ceilf(fmaxf(x1, 0.0f)));
        y_lo = static_cast<int64_t>(ceilf(fmaxf(y1, 0.0f)));
        x_hi = static_cast<int64_t>(floorf(fminf(x2, float(width - 1))));
        y_hi = static_cast<int64_t>(floorf(fminf(y2, float(height - 1))));
    }
    const int64_t box_width = x_hi >= x_lo ? x_hi - x_lo + 1 : 0;
    const int64_t box_height = y_hi >= y_lo ? y_hi - y_lo + 1 : 0;
    const int64_t count = box_width * box_height;
    const int64_t pixels = height * width;
    float sum = 0.0f;
    if (valid_label) {
        const float* plane = logits + label * pixels;
        for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
            const int64_t i = (y_lo + k / box_width) * width + x_lo + k % box_width;
            sum += expf(plane[i] - row_max[i]) / row_sum[i];
        }
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x != 0) return;
    const float agree = partial[0];
    const float n = static_cast<float>(count);
    const float disagree = n - agree;
    const float s = scores[d];
    const float prior = fminf(s / constants.score_ceiling, constants.prior_cap);
    const float y = detection_y[0] * s / n;
    const float a0 = (1.0f - prior) - y * agree;
    const float a1 = prior - y * disagree;
    const float m = fmaxf(a0, a1);
    const float e0 = expf(a0 - m), e1 = expf(a1 - m);
    const float total = e0 + e1;
    const float q0 = e0 / total, q1 = e1 / total;
    const float x = detection_x[0] * s;
    if (valid_label) {
        everyone[d] = -(x * q1);
        own[d] = x * (q1 - q0);
        label_index[d] = static_cast<int32_t>(label);
        detection_scores[d] = q1;
    } else {
        everyone[d] = nanf("");
        own[d] = nanf("");
        label_index[d] = 0;
        detection_scores[d] = nanf("");
    }
}

__global__ void combine_kernel(const float* __restrict__ unary, const float* __restrict__ pairwise,
                               float* __restrict__ logits, int64_t labels, int64_t height, int64_t width,
                               const float* __restrict__ boxes, const float* __restrict__ everyone,
                               const float* __restrict__ own, const int32_t* __restrict__ label_index,
                               int64_t detections) {
    const int64_t pixels = height * width;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < pixels; i += int64_t(gridDim.x) * blockDim.x) {
        const float x = static_cast<float>(i % width), y = static_cast<float>(i / width);
        float common = 0.0f;  // sum over the boxes holding the pixel of -x_d.Q(Y_d=1), in detection order
        for (int64_t d = 0; d < detections; ++d)
            if (inside(boxes + 4 * d, x, y)) common += everyone[d];
        for (int64_t l = 0; l < labels; ++l) {
            float mine = 0.0f;  // sum over those boxes of label l of x_d.(Q(Y_d=1) - Q(Y_d=0))
            for (int64_t d = 0; d < detections; ++d)
                if (label_index[d] == l && inside(boxes + 4 * d, x, y)) mine += own[d];
            const int64_t k = l * pixels + i;
            logits[k] = (unary[k] + (pairwise[k] - logits[k])) + (common + mine);
        }
    }
}

}  // namespace

cudaError_t launch_softmax_stats(const float* logits, int64_t labels, int64_t pixels, float* row_max,
                                 float* row_sum, cudaStream_t stream) {
    softmax_stats_kernel<<<blocks_for(pixels), kThreads, 0, stream>>>(logits, labels, pixels, row_max, row_sum);
    return cudaGetLastError();
}

cudaError_t launch_box_terms(const float* logits, const float* row_max, const float* row_sum, int64_t labels,
                             int64_t height, int64_t width, const float* boxes, const int64_t* class_ids,
                             const float* scores, const float* detection_x, const float* detection_y,
                             DetectionConstants constants, int64_t detections, float* everyone, float* own,
                             int32_t* label_index, float* detection_scores, cudaStream_t stream) {
    if (detections <= 0) return cudaSuccess;
    box_terms_kernel<<<static_cast<unsigned>(detections), kThreads, 0, stream>>>(
        logits, row_max, row_sum, labels, height, width, boxes, class_ids, scores, detection_x, detection_y,
        constants, everyone, own, label_index, detection_scores);
    return cudaGetLastError();
}

cudaError_t launch_combine(const float* unary, const float* pairwise, float* logits, int64_t labels,
                           int64_t height, int64_t width, const float* boxes, const float* everyone,
                           const float* own, const int32_t* label_index, int64_t detections,
                           cudaStream_t stream) {
    combine_kernel<<<blocks_for(height * width), kThreads, 0, stream>>>(
        unary, pairwise, logits, labels, height, width, boxes, everyone, own, label_index, detections);
    return cudaGetLastError();
}

}  // namespace tensorrt
}  // namespace dynseg
