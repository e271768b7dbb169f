// parallel.h: the one way this library runs loops on several threads.
//
// Work is split into contiguous ranges that do not depend on the thread count, and every range
// writes its own outputs, so results are the same bitwise for 1 or 64 threads.
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace dynseg {

inline int hardware_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// Calls body(begin, end) over [0, n) in ranges of `grain` items on up to `threads` threads.
template <typename Body>
void parallel_for(int64_t n, int64_t grain, int threads, const Body& body) {
    if (n <= 0) return;
    const int64_t chunks = (n + grain - 1) / grain;
#ifdef _OPENMP
    if (threads > 1 && chunks > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t begin = c * grain;
            body(begin, begin + grain < n ? begin + grain : n);
        }
        return;
    }
#endif
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t begin = c * grain;
        body(begin, begin + grain < n ? begin + grain : n);
    }
}

}  // namespace dynseg
