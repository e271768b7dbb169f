// workspace.h: carves the caller's workspace into typed arrays.
//
// The same planning code runs twice: once with no memory to count the bytes a problem needs
// (dynseg_crf_workspace_size), once over the caller's buffer to hand out pointers. Keeping one code
// path means the size query can never disagree with what the compute call takes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dynseg {

class Workspace {
public:
    // counting mode: no memory, only sizes
    Workspace() = default;
    Workspace(void* base, size_t bytes) : base_(static_cast<char*>(base)), capacity_(bytes) {}

    template <typename T>
    T* take(int64_t count) {
        constexpr size_t kAlign = 64;  // a cache line, and enough for any SIMD load
        used_ = (used_ + kAlign - 1) / kAlign * kAlign;
        const size_t bytes = static_cast<size_t>(count) * sizeof(T);
        // Past the capacity no pointer is formed (even unused, it would be undefined): the call then fails
        // at fits(), before anything is read or written.
        T* p = base_ && used_ + bytes <= capacity_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
        used_ += bytes;
        return p;
    }

    size_t used() const { return used_ + 64; }  // room to align the caller's base pointer
    bool fits() const { return base_ == nullptr || used_ <= capacity_; }

    // Align the base up front so every take() is aligned whatever the caller passed.
    void align_base() {
        if (!base_) return;
        auto addr = reinterpret_cast<uintptr_t>(base_);
        size_t shift = (64 - addr % 64) % 64;
        base_ += shift;
        capacity_ = capacity_ > shift ? capacity_ - shift : 0;
    }

private:
    char* base_ = nullptr;
    size_t capacity_ = 0;
    size_t used_ = 0;
};

}  // namespace dynseg
