// c_api.cpp: the CPU entry points of the C ABI (dynseg_crf.h). Each validates its problem (boundary.h),
// lays it out in the caller's workspace, runs the mean field, and turns exceptions into status codes,
// so nothing aborts the caller.
#include "boundary.h"
#include "dynseg_crf.h"
#include "meanfield.h"
#include "parallel.h"

#ifndef DYNSEG_VERSION
#define DYNSEG_VERSION "0.0.0"
#endif

namespace {

using dynseg::fail;
using dynseg::guarded;

// Lays the problem out in the caller's workspace and hands the MeanField to body, which returns
// false (with a message in error) when a lattice cannot be built.
template <typename Body>
dynseg_status with_mean_field(const dynseg_crf_problem& problem, int pass, void* workspace, size_t bytes,
                              const Body& body) {
    dynseg::Workspace ws(workspace, bytes);
    ws.align_base();
    dynseg::MeanField crf(problem, pass, ws);
    if (dynseg_status s = dynseg::check_workspace(ws, bytes, "dynseg_crf_workspace_size")) return s;
    char error[512] = "";
    if (!body(crf, error, static_cast<int>(sizeof(error)))) return fail(DYNSEG_ERROR_KEY_RANGE, "%s", error);
    return DYNSEG_OK;
}

}  // namespace

extern "C" {

const char* dynseg_version(void) { return DYNSEG_VERSION; }
int32_t dynseg_abi_version(void) { return DYNSEG_ABI_VERSION; }
const char* dynseg_last_error(void) { return dynseg::last_error_message(); }
int32_t dynseg_max_threads(void) { return dynseg::hardware_threads(); }
void dynseg_set_cancel_flag(const int32_t* flag) { dynseg::set_cancel_flag(flag); }

dynseg_status dynseg_crf_workspace_size(const dynseg_crf_problem* problem, int32_t pass, size_t* bytes) {
    return guarded([&] {
        // the size follows from the fields alone: the arrays may be placeholders until the compute call
        if (dynseg_status s = dynseg::validate(problem, /*read_arrays=*/false)) return s;
        if (dynseg_status s = dynseg::check_size_query(pass, bytes)) return s;
        dynseg::Workspace counter;
        dynseg::MeanField plan(*problem, pass, counter);
        *bytes = counter.used();
        return DYNSEG_OK;
    });
}

dynseg_status dynseg_crf_forward(const dynseg_crf_problem* problem, const float* unary, float* out,
                                 void* workspace, size_t workspace_bytes) {
    return guarded([&] {
        if (dynseg_status s = dynseg::validate(problem, /*read_arrays=*/true)) return s;
        if (dynseg_status s = dynseg::check_not_null({{"unary", unary}, {"out", out}, {"workspace", workspace}}))
            return s;
        if (dynseg_status s = dynseg::check_outputs_apart(*problem, DYNSEG_PASS_FORWARD)) return s;
        if (!dynseg::all_finite(unary, problem->num_labels * problem->height * problem->width))
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "unary holds a non-finite value");
        if (dynseg_status s = with_mean_field(*problem, DYNSEG_PASS_FORWARD, workspace, workspace_bytes,
                                              [&](dynseg::MeanField& crf, char* error, int error_len) {
                                                  if (!crf.prepare(error, error_len)) return false;
                                                  crf.forward(unary, out);
                                                  return true;
                                              }))
            return s;
        return dynseg::check_forward_outputs(*problem, out);
    });
}

dynseg_status dynseg_crf_backward(const dynseg_crf_problem* problem, const float* unary, const float* grad_logits,
                                  float* grad_unary, float* const* grad_weights, float* grad_compat,
                                  void* workspace, size_t workspace_bytes) {
    return guarded([&] {
        if (dynseg_status s = dynseg::validate(problem, /*read_arrays=*/true)) return s;
        if (dynseg_status s = dynseg::backward_supported(*problem)) return s;
        if (dynseg_status s = dynseg::check_not_null({{"unary", unary}, {"grad_logits", grad_logits},
                                                      {"grad_unary", grad_unary}, {"workspace", workspace}}))
            return s;
        if (dynseg_status s = dynseg::check_outputs_apart(*problem, DYNSEG_PASS_BACKWARD)) return s;
        const int64_t size = problem->num_labels * problem->height * problem->width;
        if (!dynseg::all_finite(unary, size)) return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "unary holds a non-finite value");
        if (!dynseg::all_finite(grad_logits, size))
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "grad_logits holds a non-finite value");
        const dynseg_detections* d = problem->detections;
        if (d && d->count > 0 && d->grad_recalibrated && !dynseg::all_finite(d->grad_recalibrated, d->count))
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "detections->grad_recalibrated holds a non-finite value");
        if (dynseg_status s = with_mean_field(*problem, DYNSEG_PASS_BACKWARD, workspace, workspace_bytes,
                                              [&](dynseg::MeanField& crf, char* error, int error_len) {
                                                  if (!crf.prepare(error, error_len)) return false;
                                                  crf.backward(unary, grad_logits, grad_unary, grad_weights,
                                                               grad_compat);
                                                  return true;
                                              }))
            return s;
        return dynseg::check_backward_outputs(*problem, grad_unary, grad_weights, grad_compat);
    });
}

dynseg_status dynseg_lattice_filter(const dynseg_crf_problem* problem, int32_t kernel, int64_t channels,
                                    const float* values, float* out, int32_t transpose, void* workspace,
                                    size_t workspace_bytes) {
    return guarded([&] {
        if (dynseg_status s = dynseg::validate(problem, /*read_arrays=*/true)) return s;
        if (problem->num_kernels == 0)
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "the problem has no kernels (num_kernels = 0) to filter with");
        if (kernel < 0 || kernel >= problem->num_kernels)
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "kernel must be in 0..%d, got %d", problem->num_kernels - 1,
                        kernel);
        if (channels < 1 || channels > problem->num_labels)
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "channels must be in 1..num_labels (%lld), got %lld",
                        (long long)problem->num_labels, (long long)channels);
        if (dynseg_status s = dynseg::check_not_null({{"values", values}, {"out", out}, {"workspace", workspace}}))
            return s;
        const int64_t size = channels * problem->height * problem->width;
        if (!dynseg::all_finite(values, size))
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "values holds a non-finite value");
        if (dynseg_status s = with_mean_field(*problem, DYNSEG_PASS_FORWARD, workspace, workspace_bytes,
                                              [&](dynseg::MeanField& crf, char* error, int error_len) {
                                                  return crf.filter(kernel, channels, values, out, transpose != 0,
                                                                    error, error_len);
                                              }))
            return s;
        if (!dynseg::all_finite(out, size))
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "the filtered values overflowed float32: the values are finite "
                        "but too large; scale them down");
        return DYNSEG_OK;
    });
}

}  // extern "C"
