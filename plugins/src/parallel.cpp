// parallel.cpp: the library's thread pool.
//
// A call to run_chunks posts a job; the caller works on it and so do idle pool threads, each taking
// the next chunk from an atomic counter. The caller leaves only once every chunk is done and no pool
// thread still holds the job (it lives on the caller's stack). Pool threads wait on a condition
// variable, so an idle pool costs nothing.
//
// The pool is never destroyed: at exit its threads are left waiting, as the process ends them. A forked
// child inherits the pool without its threads (and maybe with its mutex held by one that is gone), so it
// leaves that copy alone and starts a pool of its own; destroying the copy would wait on those threads.
#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__unix__)
#include <pthread.h>
#endif

namespace dynseg {
namespace {

struct Job {
    const std::function<void(int64_t)>* body;
    int64_t chunks;
    int max_helpers;                  // pool threads allowed on this job
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
    int helpers = 0;                  // pool threads working on it now (guarded by the pool's mutex)

    bool wants_help() const { return helpers < max_helpers && next.load() < chunks; }

    void work() {
        for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
            (*body)(c);
            finished.fetch_add(1);
        }
    }
};

class Pool {
public:
    void run(Job& job) {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            start_workers();
            jobs_.push_back(&job);
        }
        work_ready_.notify_all();
        job.work();
        std::unique_lock<std::mutex> lock(mutex_);
        jobs_.erase(std::find(jobs_.begin(), jobs_.end(), &job));
        job_done_.wait(lock, [&] { return job.finished.load() == job.chunks && job.helpers == 0; });
    }

private:
    void start_workers() {  // lazily, so a library that never runs in parallel starts no thread
        if (started_) return;
        started_ = true;
        const int count = hardware_threads() - 1;
        try {
            for (int i = 0; i < count; ++i) workers_.emplace_back([this] { serve(); });
        } catch (const std::system_error&) {
            // a process at its thread limit: the pool keeps the threads it got, and with none the
            // callers do all the work themselves (same chunks, so the same results), slower
        }
    }

    Job* job_wanting_help() {
        for (Job* job : jobs_)
            if (job->wants_help()) return job;
        return nullptr;
    }

    void serve() {
        std::unique_lock<std::mutex> lock(mutex_);
        for (;;) {
            Job* job = nullptr;
            work_ready_.wait(lock, [&] { return (job = job_wanting_help()) != nullptr; });
            ++job->helpers;
            lock.unlock();
            job->work();
            lock.lock();
            --job->helpers;
            job_done_.notify_all();
        }
    }

    std::mutex mutex_;
    std::condition_variable work_ready_, job_done_;
    std::deque<Job*> jobs_;
    std::vector<std::thread> workers_;
    bool started_ = false;
};

std::atomic<Pool*> the_pool{nullptr};

#if defined(__unix__)
void forget_pool_in_child() { the_pool.store(nullptr); }
#endif

Pool& pool() {
#if defined(__unix__)
    static const bool forgotten_at_fork = pthread_atfork(nullptr, nullptr, forget_pool_in_child) == 0;
    (void)forgotten_at_fork;
#endif
    Pool* current = the_pool.load();
    if (current) return *current;
    Pool* fresh = new Pool;  // no thread yet: the loser of a race below deletes it
    if (the_pool.compare_exchange_strong(current, fresh)) return *fresh;
    delete fresh;
    return *current;
}

}  // namespace

int hardware_threads() {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
    return std::max(1u, std::thread::hardware_concurrency());
}

void run_chunks(int64_t chunks, int threads, const std::function<void(int64_t)>& body) {
    Job job;
    job.body = &body;
    job.chunks = chunks;
    job.max_helpers = std::max(0, std::min(threads, hardware_threads()) - 1);
    if (job.max_helpers == 0) {
        job.work();
        return;
    }
    pool().run(job);
}

}  // namespace dynseg
