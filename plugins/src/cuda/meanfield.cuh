// meanfield.cuh: mean-field inference and its gradient on the GPU, over validated problems.
//
// The same iteration as plugins/src/meanfield.cpp (its header comment has the maths), written as one
// general path: per kernel, filter Q through the lattice and add W_k Knorm_k(Q) to the logits, then
// apply the compatibility and the softmax. Every array lives in the caller's device workspace, laid
// out by the constructor (in counting mode for the size query); every call only enqueues work.
#pragma once

#include <cstdint>

#include "../parameters.h"
#include "../workspace.h"
#include "detections.cuh"
#include "dynseg_crf.h"
#include "lattice.cuh"

namespace dynseg {
namespace cuda {

// cudaSuccess where the current device can run this build's kernels (SASS for its architecture, or PTX
// it can compile), else the error that says why not (cudaErrorNoKernelImageForDevice, say).
cudaError_t kernel_image_status();

class MeanField {
public:
    MeanField(const dynseg_crf_problem& problem, int pass, Workspace& ws);

    // Each enqueues the lattice builds, then the pass, on launch.stream.
    void forward(const float* unary, float* out, const Launch& launch);
    void backward(const float* unary, const float* grad_logits, float* grad_unary, float* const* grad_weights,
                  float* grad_compat, const Launch& launch);

private:
    void prepare(const Launch& launch);
    void start(const float* unary, float* q, const Launch& launch);
    void finish(float* out, const Launch& launch);
    void run_iterations(float* history, const Launch& launch);
    void messages(const float* q, const Launch& launch);
    void apply_compatibility(const Launch& launch);
    void softmax(const float* logits, float* q, const Launch& launch) const;
    float* norm(int k) const { return norm_ + k * pixels_; }

    const dynseg_crf_problem& problem_;
    int64_t labels_ = 0, pixels_ = 0, stride_ = 0;
    Status* status_ = nullptr;
    FeatureSpec specs_[DYNSEG_MAX_KERNELS];
    Lattice lattices_[DYNSEG_MAX_KERNELS];
    float* norm_ = nullptr;  // (K, N) each kernel's normalisation D_k
    BuildScratch scratch_;
    DetectionPotential detections_;
    float* unary_ = nullptr;
    float* q_ = nullptr;
    float* filtered_ = nullptr;
    float* acc_ = nullptr;
    // backward only
    float* history_ = nullptr;  // (T, N, stride): Q^0 .. Q^{T-1}
    float* grad_logits_ = nullptr;
    float* grad_q_ = nullptr;
    float* grad_unary_ = nullptr;
    float* grad_message_ = nullptr;
    double* partial_ = nullptr;  // (chunks, P's width) per-chunk sums, added in chunk order
    double* P_ = nullptr;        // (L, L), or its diagonal (L,) where no matrix weight or full mu reads the rest
    double* dweight_[DYNSEG_MAX_KERNELS] = {};
    double* dmu_ = nullptr;
    int64_t reduce_chunk_ = 0;
};

}  // namespace cuda
}  // namespace dynseg
