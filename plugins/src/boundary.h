// boundary.h (defined in boundary.cpp): what every C entry point shares, CPU (c_api.cpp) and CUDA
// (cuda/c_api.cu): the per-thread error message and cancel flag, validation of a problem's fields
// before any work and of the outputs after it, and the guard that keeps exceptions from crossing into
// the caller.
#pragma once

#include <cstdint>
#include <exception>
#include <initializer_list>
#include <new>

#include "dynseg_crf.h"
#include "workspace.h"

namespace dynseg {

// Records a printf-style message as this thread's last error and returns status.
dynseg_status fail(dynseg_status status, const char* format, ...);

// This thread's last error message (dynseg_last_error).
const char* last_error_message();

// This thread's cancel flag (dynseg_set_cancel_flag; null: none).
void set_cancel_flag(const int32_t* flag);

// Thrown by stop_if_cancelled; `guarded` turns it into DYNSEG_ERROR_CANCELLED. Not a std::exception,
// so that no handler for those takes it for a failure.
struct Cancelled {};

// Throws Cancelled when this thread's cancel flag is set: called between mean-field iterations, on
// the thread that made the C call.
void stop_if_cancelled();

// Whether every one of count host floats is finite.
bool all_finite(const float* values, int64_t count);

// A pointer argument and its name in the C API.
struct Named {
    const char* name;
    const void* pointer;
};

// Names the first of the pointers that is NULL ("out is NULL"); DYNSEG_OK when none is.
dynseg_status check_not_null(std::initializer_list<Named> pointers);

// Checks every field of a problem. read_arrays: also scan the image, weights and compatibility for
// non-finite values (only possible when they are host memory).
dynseg_status validate(const dynseg_crf_problem* problem, bool read_arrays);

// What a compute call adds to validate(), and a size query may not ask (its arrays may all be one
// placeholder): the recalibrated detection scores, which every iteration writes, share no memory with
// the detection arrays it reads after (and, for pass DYNSEG_PASS_BACKWARD, grad_recalibrated). Compares
// addresses only, so device pointers are checked too.
dynseg_status check_outputs_apart(const dynseg_crf_problem& problem, int32_t pass);

// After a call on validated, finite inputs: whether its host outputs are finite too. Finite inputs
// can still be too large together for float32, and the library reports that rather than hand back
// NaN or infinity as a result (the outputs are written all the same).
dynseg_status check_forward_outputs(const dynseg_crf_problem& problem, const float* out);
dynseg_status check_backward_outputs(const dynseg_crf_problem& problem, const float* grad_unary,
                                     float* const* grad_weights, const float* grad_compat);

// The arguments of a workspace-size query besides its problem: the pass and where the size goes.
dynseg_status check_size_query(int32_t pass, const size_t* bytes);

// Whether the caller's workspace of `bytes` holds the layout planned into ws; size_call names the
// query that gives the size needed.
dynseg_status check_workspace(const Workspace& ws, size_t bytes, const char* size_call);

// What the backward calls add to validate(): logits output.
dynseg_status backward_supported(const dynseg_crf_problem& problem);

// Runs body, turning any escaping exception into a status: nothing crosses the C boundary.
template <typename Body>
dynseg_status guarded(const Body& body) {
    try {
        return body();
    } catch (const Cancelled&) {
        return fail(DYNSEG_ERROR_CANCELLED, "cancelled: the calling thread's cancel flag was set");
    } catch (const std::bad_alloc&) {
        return fail(DYNSEG_ERROR_INTERNAL, "out of memory");
    } catch (const std::exception& e) {
        return fail(DYNSEG_ERROR_INTERNAL, "internal error: %s", e.what());
    } catch (...) {
        return fail(DYNSEG_ERROR_INTERNAL, "internal error");
    }
}

}  // namespace dynseg
