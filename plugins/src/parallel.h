// parallel.h: the one way this library runs loops on several threads.
//
// Work is split into contiguous ranges that do not depend on the thread count, and every range
// writes its own outputs, so results are the same bitwise for 1 or 64 threads. The ranges run on a
// small pool of the library's own threads, which sleep (never spin) while there is no work: an
// application's other threads (torch's, a robot's control loop) keep their cores.
#pragma once

#include <cstdint>
#include <functional>

namespace dynseg {

// Threads this process may run on (its CPU affinity), at least 1.
int hardware_threads();

// Calls body(chunk) for every chunk in [0, chunks), on the calling thread and up to threads - 1 of
// the pool's; returns when all are done. Safe to call from several threads at once.
void run_chunks(int64_t chunks, int threads, const std::function<void(int64_t)>& body);

// Calls body(begin, end) over [0, n) in ranges of `grain` items on up to `threads` threads.
template <typename Body>
void parallel_for(int64_t n, int64_t grain, int threads, const Body& body) {
    if (n <= 0) return;
    const int64_t chunks = (n + grain - 1) / grain;
    auto range = [&](int64_t c) {
        const int64_t begin = c * grain;
        body(begin, begin + grain < n ? begin + grain : n);
    };
    if (threads <= 1 || chunks == 1) {
        for (int64_t c = 0; c < chunks; ++c) range(c);
        return;
    }
    run_chunks(chunks, threads, range);
}

}  // namespace dynseg
