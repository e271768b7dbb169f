// meanfield.h: mean-field inference (meanfield.cpp) and its gradient (meanfield_backward.cpp) over
// validated problems.
//
// The entry points in c_api.cpp validate a dynseg_crf_problem, then hand it here. A MeanField
// owns the layout of one call's workspace (planned once for the size query and once for real),
// builds each kernel's lattice once and reuses it for the normalisation and every iteration.
#pragma once

#include <cstdint>
#include <vector>

#include "detections.h"
#include "dynseg_crf.h"
#include "lattice.h"
#include "parameters.h"
#include "simd.h"
#include "workspace.h"

namespace dynseg {

constexpr int64_t kGrain = 1024;  // pixels per parallel_for task

class MeanField {
public:
    // Lays out the arrays of `pass` for `problem` (counting mode when ws has no memory).
    MeanField(const dynseg_crf_problem& problem, int pass, Workspace& ws);

    // Builds every kernel's lattice and normalisation. False (error filled) if a lattice cannot be built.
    bool prepare(char* error, int error_len);

    void forward(const float* unary, float* out);  // L^T or Q^T, as problem.output says
    void backward(const float* unary, const float* grad_logits, float* grad_unary,
                  float* const* grad_weights, float* grad_compat);

    // The raw filter of kernel k over (channels, H, W) values; the problem's labels must be >= channels.
    bool filter(int kernel, int64_t channels, const float* values, float* out, bool transpose,
                char* error, int error_len);

private:
    void run_iterations(float* history);
    bool can_stream() const;
    void scalar_messages_all_tiles(const float* q);
    void stream_iterations(const float* unary, float* history, float* planar_out);
    template <int V>
    void stream_iterations(const float* unary, float* history, float* planar_out);
    template <int V>
    void scalar_messages(int64_t c0, const float* q);
    void kernel_message(int k, const float* q, bool first);
    ivec8 lanes_in_use() const;
    void apply_compatibility() const;
    std::vector<float> padded_columns(const float* M) const;
    void softmax(const float* logits, float* q) const;
    void softmax_range(const float* logits, float* q, int64_t first, int64_t last, int threads) const;
    void kernel_backward(int k, const float* Q, std::vector<double>& P, std::vector<double>& dweight,
                         std::vector<double>& dmu);
    void add_parameter_gradients(const dynseg_kernel& kernel, const std::vector<double>& P,
                                 std::vector<double>& dweight, std::vector<double>& dmu) const;
    void to_pixel_major(const float* planar, float* pixel_major, int64_t channels) const;
    void to_planar(const float* pixel_major, float* planar, int64_t channels, bool apply_softmax = false) const;

    const dynseg_crf_problem& problem_;
    int64_t labels_ = 0, pixels_ = 0;
    int64_t stride_ = 0;  // row length of the pixel-major arrays: labels padded to whole vectors
    int threads_ = 1;
    FeatureSpec specs_[DYNSEG_MAX_KERNELS];
    Lattice lattices_[DYNSEG_MAX_KERNELS];
    float* norm_[DYNSEG_MAX_KERNELS] = {};
    LatticeScratch scratch_;
    DetectionPotential detections_;

    // pixel-major (N, stride) arrays
    float* unary_ = nullptr;
    float* q_ = nullptr;
    float* filtered_ = nullptr;
    float* logits_ = nullptr;  // the messages summed into the logits: U + m (Potts) or m, then L = U - mu m
    // backward only
    float* history_ = nullptr;  // (T, N, stride): Q^0 .. Q^{T-1} (with detections, their beliefs: detections_)
    float* grad_logits_ = nullptr;   // G = dLoss/dL^t of the iteration being walked back
    float* grad_q_ = nullptr;        // dLoss/dQ^{t-1}
    float* grad_unary_ = nullptr;    // dLoss/dU, summed over the iterations
    float* grad_message_ = nullptr;  // H = -mu^T Knorm^T G, dLoss/dm
    double* partial_ = nullptr;  // (chunks, L, L) per-chunk sums, added in chunk order
    int64_t reduce_chunk_ = 0;
};

}  // namespace dynseg
