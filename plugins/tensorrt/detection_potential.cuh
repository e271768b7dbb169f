/*
 * detection_potential.cuh: the higher-order detection potential of dynseg::MeanFieldCRF (docs/ops.md,
 * "With it"; ALGORITHM.md §4) on the GPU, between the native library's one-iteration mean-field calls.
 *
 * One iteration t, with X = L^{t-1} (L, H, W) and the native call's output P = X - mu.m(softmax(X)):
 *   1. dynseg_detection_softmax_stats: per pixel, the max and the sum of exp(X - max) over the labels.
 *   2. dynseg_detection_box_terms: per detection d, A_d = sum over the box of Q(l_d) (fixed-order block
 *      reduction), y_d, a0_d, a1_d, Q(Y_d) = softmax(a0_d, a1_d); writes -x_d.Q(Y_d=1), x_d.(Q(Y_d=1) - Q(Y_d=0))
 *      and the recalibrated score Q(Y_d=1).
 *   3. dynseg_detection_combine: per pixel and label, X <- (U + (P - X)) + (sum_d everyone_d + sum_d own_d),
 *      the sums over the detections whose box holds the pixel, in detection order.
 *
 * Everything is deterministic (no atomics, fixed reduction orders) and only enqueued on `stream`: no
 * allocation, no synchronisation. Each launcher returns the launch's cudaError_t (cudaSuccess or the
 * launch error). Detections whose label is outside 0..L-1 cannot be reported from the device: their score
 * and the logits inside their box become NaN, the CUDA library's convention for bad device data.
 */
#ifndef DYNSEG_TENSORRT_DETECTION_POTENTIAL_CUH
#define DYNSEG_TENSORRT_DETECTION_POTENTIAL_CUH

#include <cstdint>

#include <cuda_runtime_api.h>

namespace dynseg {
namespace tensorrt {

/* Host-side constants of the detection potential (attributes of the node). */
struct DetectionConstants {
    float score_ceiling;  // s_max > 0
    float prior_cap;      // 1 - epsilon, rounded to float as the numpy reference does
};

/* row_max, row_sum: (H*W) each. logits: (L, H, W). */
cudaError_t launch_softmax_stats(const float* logits, int64_t labels, int64_t pixels, float* row_max,
                                 float* row_sum, cudaStream_t stream);

/* boxes (D, 4) xyxy inclusive, class_ids (D,) int64, scores (D,), detection_x, detection_y: device scalars.
 * Writes everyone (D,), own (D,), label_index (D,) int32 and detection_scores (D,). */
cudaError_t launch_box_terms(const float* logits, const float* row_max, const float* row_sum, int64_t labels,
                             int64_t height, int64_t width, const float* boxes, const int64_t* class_ids,
                             const float* scores, const float* detection_x, const float* detection_y,
                             DetectionConstants constants, int64_t detections, float* everyone, float* own,
                             int32_t* label_index, float* detection_scores, cudaStream_t stream);

/* logits (L, H, W), in place: logits <- (unary + (pairwise - logits)) + detection term. */
cudaError_t launch_combine(const float* unary, const float* pairwise, float* logits, int64_t labels,
                           int64_t height, int64_t width, const float* boxes, const float* everyone,
                           const float* own, const int32_t* label_index, int64_t detections,
                           cudaStream_t stream);

}  // namespace tensorrt
}  // namespace dynseg

#endif  // DYNSEG_TENSORRT_DETECTION_POTENTIAL_CUH
