// parameters.h: how many values a problem's parameters hold, read the same way by the validation, the CPU
// and CUDA mean fields and their gradients: a kernel weight is one value or an L x L matrix, and the
// compatibility is none (Potts), L (diagonal) or L x L (full) values.
#pragma once

#include <cstdint>

#include "dynseg_crf.h"

namespace dynseg {

inline bool is_matrix(const dynseg_kernel& kernel) { return kernel.weight_kind == DYNSEG_WEIGHT_MATRIX; }

inline int64_t weight_count(const dynseg_kernel& kernel, int64_t labels) {
    return is_matrix(kernel) ? labels * labels : 1;
}

inline int64_t compat_count(int32_t compat_kind, int64_t labels) {
    return compat_kind == DYNSEG_COMPAT_FULL ? labels * labels : compat_kind == DYNSEG_COMPAT_DIAGONAL ? labels : 0;
}

}  // namespace dynseg
