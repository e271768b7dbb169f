// kernel_features.h: what the CPU and the CUDA lattices share about a kernel's features: which features a
// kernel of a problem has (FeatureSpec), and the factor each gets on its way into the permutohedral
// lattice, which both embeddings must round alike to put every pixel on the same vertices; and the
// label tile both filter at a time.
#pragma once

#include <cmath>
#include <cstdint>

#include "dynseg_crf.h"

namespace dynseg {

constexpr int kMaxFeatureDim = 2 + DYNSEG_MAX_COLOR_CHANNELS;
constexpr int kLabelTile = 32;  // value channels filtered per pass: bounds the lattice value buffers

// What defines a kernel's features for pixel (x, y): (x/theta_xy, y/theta_xy, c_1/theta_color, ...).
struct FeatureSpec {
    int64_t height = 0, width = 0;
    float theta_xy = 1.0f;
    float theta_color = 0.0f;      // 0: spatial kernel
    int64_t channels = 0;          // colour channels used (0 for a spatial kernel)
    const float* image = nullptr;  // (channels, H, W), in the memory the call computes in

    int dim() const { return 2 + static_cast<int>(channels); }
    int64_t pixels() const { return height * width; }
};

// The features of problem.kernels[k]: a spatial kernel (theta_color 0) reads no colour.
inline FeatureSpec feature_spec(const dynseg_crf_problem& problem, int k) {
    FeatureSpec s;
    s.height = problem.height;
    s.width = problem.width;
    s.theta_xy = problem.kernels[k].theta_xy;
    s.theta_color = problem.kernels[k].theta_color;
    s.channels = s.theta_color > 0.0f ? problem.image_channels : 0;
    s.image = problem.image;
    return s;
}

// Feature i's factor in a d-dimensional lattice. densecrf rounds inv_std_dev to float before the
// double-precision scale computation.
inline float feature_scale(int d, int i) {
    const float inv_std_dev = static_cast<float>(std::sqrt(2.0 / 3.0) * (d + 1));
    return static_cast<float>(1.0 / std::sqrt(static_cast<double>((i + 2) * (i + 1))) *
                              static_cast<double>(inv_std_dev));
}

}  // namespace dynseg
