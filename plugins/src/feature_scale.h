// feature_scale.h: the factor each feature gets on its way into the permutohedral lattice, shared
// by the CPU and the CUDA embedding, which must round alike to put every pixel on the same vertices.
#pragma once

#include <cmath>

namespace dynseg {

// Feature i's factor in a d-dimensional lattice. densecrf rounds inv_std_dev to float before the
// double-precision scale computation.
inline float feature_scale(int d, int i) {
    const float inv_std_dev = static_cast<float>(std::sqrt(2.0 / 3.0) * (d + 1));
    return static_cast<float>(1.0 / std::sqrt(static_cast<double>((i + 2) * (i + 1))) *
                              static_cast<double>(inv_std_dev));
}

}  // namespace dynseg
