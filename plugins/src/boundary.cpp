// boundary.cpp: what every C entry point shares (boundary.h): the per-thread error message and cancel
// flag, the validation of every field of a problem before any work, the overflow checks of the outputs
// after it, and the guard.
#include "boundary.h"

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <limits>

#include "detections.h"
#include "parameters.h"
#include "simd.h"

namespace {

// A fixed buffer: recording a failure must not allocate, as it runs in the handlers of `guarded`,
// including the one for std::bad_alloc.
thread_local char last_error[512] = "";
thread_local const int32_t* cancel_flag = nullptr;

}  // namespace

namespace dynseg {

// x·0 is ±0 for finite x and NaN for inf or NaN; eight lanes keep the scan vectorised.
bool all_finite(const float* values, int64_t count) {
    vec8 acc = splat8(0.0f);
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) acc += load8(values + i) * splat8(0.0f);
    float rest = 0.0f;
    for (; i < count; ++i) rest += values[i] * 0.0f;
    return sum8(acc) + rest == 0.0f;
}

dynseg_status fail(dynseg_status status, const char* format, ...) {
    char buffer[512];
    va_list args;
    va_start(args, format);
    std::vsnprintf(buffer, sizeof(buffer), format, args);
    va_end(args);
    std::memcpy(last_error, buffer, sizeof(buffer));
    return status;
}

dynseg_status check_not_null(std::initializer_list<Named> pointers) {
    for (const Named& argument : pointers)
        if (!argument.pointer) return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "%s is NULL", argument.name);
    return DYNSEG_OK;
}

namespace {

// Whether the arrays of a_bytes at a and b_bytes at b share memory; compares addresses only, so device
// pointers may be asked about too, and a NULL array (an absent optional one) shares none.
bool overlap(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
    if (!a || !b) return false;
    const auto begin_a = reinterpret_cast<std::uintptr_t>(a), begin_b = reinterpret_cast<std::uintptr_t>(b);
    return begin_a < begin_b + b_bytes && begin_b < begin_a + a_bytes;
}

dynseg_status validate_detections(const dynseg_crf_problem& p, bool read_arrays) {
    const dynseg_detections& d = *p.detections;
    if (d.count < 0 || d.count > DYNSEG_MAX_DETECTIONS)
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "detections->count must be in 0..%d, got %lld", DYNSEG_MAX_DETECTIONS,
                    (long long)d.count);
    if (d.count == 0) return DYNSEG_OK;  // no potential: its other fields are not read
    // the backward pass keeps every iteration's beliefs and box sums: (T + 1) x D of them, under 16 bytes each
    if (d.count > std::numeric_limits<int64_t>::max() / 16 / (int64_t(p.iterations) + 1))
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "detections->count x (iterations + 1) overflows: %lld x %lld",
                    (long long)d.count, (long long)p.iterations + 1);
    if (!(std::isfinite(d.score_ceiling) && d.score_ceiling > 0.0f))
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "detections->score_ceiling must be finite and > 0, got %g",
                    d.score_ceiling);
    if (!(d.epsilon >= 0.0f && d.epsilon < 1.0f))
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "detections->epsilon must be in [0, 1), got %g", d.epsilon);
    if (dynseg_status s = check_not_null({{"detections->boxes", d.boxes}, {"detections->labels", d.labels},
                                          {"detections->scores", d.scores}, {"detections->detection_x", d.detection_x},
                                          {"detections->detection_y", d.detection_y}}))
        return s;
    if (!read_arrays) return DYNSEG_OK;
    if (!all_finite(d.detection_x, 1) || !all_finite(d.detection_y, 1))
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "detections->detection_x and detection_y must be finite, got %g, %g",
                    *d.detection_x, *d.detection_y);
    for (int64_t i = 0; i < d.count; ++i) {
        const float* box = d.boxes + 4 * i;
        if (!all_finite(box, 4))
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "detections->boxes[%lld] holds a non-finite value", (long long)i);
        if (box_span(box, p.height, p.width).count() == 0)
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT,
                        "detections->boxes[%lld] = (%g, %g, %g, %g) holds no pixel of the %lldx%lld image", (long long)i,
                        box[0], box[1], box[2], box[3], (long long)p.height, (long long)p.width);
        if (d.labels[i] < 0 || d.labels[i] >= p.num_labels)
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "detections->labels[%lld] must be in 0..%lld, got %lld",
                        (long long)i, (long long)(p.num_labels - 1), (long long)d.labels[i]);
        if (!all_finite(d.scores + i, 1) || d.scores[i] < 0.0f)
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "detections->scores[%lld] must be finite and >= 0, got %g",
                        (long long)i, d.scores[i]);
    }
    return DYNSEG_OK;
}

}  // namespace

dynseg_status validate(const dynseg_crf_problem* p, bool read_arrays) {
    if (!p) return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "problem is NULL");
    if (p->num_labels < 1 || p->num_labels > DYNSEG_MAX_LABELS)
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "num_labels must be in 1..%d, got %lld", DYNSEG_MAX_LABELS,
                    (long long)p->num_labels);
    // before any size arithmetic that uses it
    if (p->iterations < 0) return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "iterations must be >= 0, got %d", p->iterations);
    if (p->height < 1 || p->width < 1)
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "height and width must be >= 1, got %lldx%lld",
                    (long long)p->height, (long long)p->width);
    if (p->image_channels < 0 || p->image_channels > DYNSEG_MAX_COLOR_CHANNELS)
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "image_channels must be in 0..%d, got %lld",
                    DYNSEG_MAX_COLOR_CHANNELS, (long long)p->image_channels);
    if (p->num_kernels < 0 || p->num_kernels > DYNSEG_MAX_KERNELS)
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "num_kernels must be in 0..%d, got %d", DYNSEG_MAX_KERNELS,
                    p->num_kernels);
    if (p->num_kernels > 0 && !p->kernels) return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "kernels is NULL");
    // each side first, so that the product cannot overflow
    if (p->height > DYNSEG_MAX_PIXELS || p->width > DYNSEG_MAX_PIXELS || p->height * p->width > DYNSEG_MAX_PIXELS)
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "image of %lldx%lld pixels is too large (at most %d pixels)",
                    (long long)p->height, (long long)p->width, DYNSEG_MAX_PIXELS);
    const int64_t pixels = p->height * p->width;
    if (p->num_labels > std::numeric_limits<int64_t>::max() / 8 / pixels / (int64_t(p->iterations) + 8))
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "num_labels x pixels x iterations overflows: %lld x %lld x %d",
                    (long long)p->num_labels, (long long)pixels, p->iterations);
    const int64_t L = p->num_labels;
    for (int k = 0; k < p->num_kernels; ++k) {
        const dynseg_kernel& kernel = p->kernels[k];
        if (!(std::isfinite(kernel.theta_xy) && kernel.theta_xy > 0.0f))
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "kernels[%d].theta_xy must be finite and > 0, got %g", k,
                        kernel.theta_xy);
        if (!(std::isfinite(kernel.theta_color) && kernel.theta_color >= 0.0f))
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT,
                        "kernels[%d].theta_color must be finite and > 0 (or 0 for a spatial kernel), got %g", k,
                        kernel.theta_color);
        if (kernel.theta_color > 0.0f && (p->image_channels < 1 || !p->image))
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "kernels[%d] is bilateral (theta_color = %g) but the problem "
                        "has no image: %s", k, kernel.theta_color,
                        p->image ? "image_channels is 0" : "image is NULL");
        if (kernel.weight_kind != DYNSEG_WEIGHT_SCALAR && kernel.weight_kind != DYNSEG_WEIGHT_MATRIX)
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "kernels[%d].weight_kind must be 0 (scalar) or 1 (matrix), got %d",
                        k, kernel.weight_kind);
        if (!kernel.weight) return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "kernels[%d].weight is NULL", k);
        if (read_arrays && !all_finite(kernel.weight, weight_count(kernel, L)))
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "kernels[%d].weight holds a non-finite value", k);
    }
    if (p->compat_kind < DYNSEG_COMPAT_POTTS || p->compat_kind > DYNSEG_COMPAT_FULL)
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "compat_kind must be 0 (Potts), 1 (diagonal) or 2 (full), got %d",
                    p->compat_kind);
    if (p->compat_kind != DYNSEG_COMPAT_POTTS) {
        if (!p->compat) return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "compat is NULL for a non-Potts compatibility");
        if (read_arrays && !all_finite(p->compat, compat_count(p->compat_kind, L)))
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "compat holds a non-finite value");
    }
    if (p->normalization != DYNSEG_NORMALIZE_AFTER && p->normalization != DYNSEG_NORMALIZE_SYMMETRIC)
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "normalization must be 0 (after) or 1 (symmetric), got %d",
                    p->normalization);
    if (p->output != DYNSEG_OUTPUT_LOGITS && p->output != DYNSEG_OUTPUT_PROBABILITIES)
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "output must be 0 (logits) or 1 (probabilities), got %d", p->output);
    if (p->threads < 0) return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "threads must be >= 0, got %d", p->threads);
    if (read_arrays && p->image && p->image_channels > 0 && !all_finite(p->image, p->image_channels * pixels))
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "image holds a non-finite value");
    return p->detections ? validate_detections(*p, read_arrays) : DYNSEG_OK;
}

dynseg_status check_outputs_apart(const dynseg_crf_problem& p, int32_t pass) {
    const dynseg_detections* d = p.detections;
    if (!d || d->count <= 0 || !d->recalibrated) return DYNSEG_OK;
    // every iteration writes the recalibrated scores and then reads the detections again: written over,
    // the scores would feed one iteration's output into the next one's prior, the boxes and weights would
    // change the model mid-call, and the labels, which index the logits, would send writes anywhere; the
    // backward pass rewrites them before it reads grad_recalibrated
    const size_t floats = static_cast<size_t>(d->count) * sizeof(float);
    const struct {
        const char* name;
        const void* pointer;
        size_t bytes;
    } read_after_writing[] = {
        {"scores", d->scores, floats},
        {"boxes", d->boxes, 4 * floats},
        {"labels", d->labels, static_cast<size_t>(d->count) * sizeof(int64_t)},
        {"detection_x", d->detection_x, sizeof(float)},
        {"detection_y", d->detection_y, sizeof(float)},
        {"grad_recalibrated", pass == DYNSEG_PASS_BACKWARD ? d->grad_recalibrated : nullptr, floats},
    };
    for (const auto& input : read_after_writing)
        if (overlap(d->recalibrated, floats, input.pointer, input.bytes))
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "detections->recalibrated overlaps detections->%s: give the "
                        "recalibrated scores a buffer of their own", input.name);
    return DYNSEG_OK;
}

dynseg_status check_size_query(int32_t pass, const size_t* bytes) {
    if (pass != DYNSEG_PASS_FORWARD && pass != DYNSEG_PASS_BACKWARD)
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "pass must be 0 (forward) or 1 (backward), got %d", pass);
    if (!bytes) return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "bytes is NULL");
    return DYNSEG_OK;
}

dynseg_status check_workspace(const Workspace& ws, size_t bytes, const char* size_call) {
    if (ws.fits()) return DYNSEG_OK;
    return fail(DYNSEG_ERROR_WORKSPACE_TOO_SMALL, "workspace of %zu bytes is too small: %zu needed (see %s)", bytes,
                ws.used(), size_call);
}

dynseg_status backward_supported(const dynseg_crf_problem& p) {
    if (p.output != DYNSEG_OUTPUT_LOGITS)
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "backward needs output = DYNSEG_OUTPUT_LOGITS, got %d", p.output);
    return DYNSEG_OK;
}

dynseg_status check_forward_outputs(const dynseg_crf_problem& p, const float* out) {
    const dynseg_detections* d = p.detections && p.detections->count > 0 ? p.detections : nullptr;
    const bool scores_finite = !d || !d->recalibrated || all_finite(d->recalibrated, d->count);
    if (all_finite(out, p.num_labels * p.height * p.width) && scores_finite) return DYNSEG_OK;
    constexpr const char* kOverflow = "the logits overflowed float32 during mean field: the inputs are finite but too "
                                      "large together; scale down the unary, the kernel weights";
    if (!d) return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "%s or the compatibility", kOverflow);
    float largest = 0.0f;
    for (int64_t i = 0; i < d->count; ++i) largest = std::max(largest, std::fabs(d->scores[i]));
    return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "%s, the compatibility or the detection scores (largest |score| %g)",
                kOverflow, largest);
}

dynseg_status check_backward_outputs(const dynseg_crf_problem& p, const float* grad_unary, float* const* grad_weights,
                                     const float* grad_compat) {
    const int64_t L = p.num_labels;
    bool finite = all_finite(grad_unary, L * p.height * p.width);
    for (int k = 0; grad_weights && k < p.num_kernels; ++k)
        if (grad_weights[k])
            finite = finite && all_finite(grad_weights[k], weight_count(p.kernels[k], L));
    if (grad_compat && p.compat_kind != DYNSEG_COMPAT_POTTS)
        finite = finite && all_finite(grad_compat, compat_count(p.compat_kind, L));
    const dynseg_detections* d = p.detections && p.detections->count > 0 ? p.detections : nullptr;
    for (const float* grad : {d ? d->grad_detection_x : nullptr, d ? d->grad_detection_y : nullptr})
        finite = finite && (!grad || all_finite(grad, 1));
    if (finite) return DYNSEG_OK;
    return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "the gradients overflowed float32 during the backward pass: the inputs "
                "are finite but too large together; scale down grad_logits, the unary or the kernel weights%s",
                d ? " (or grad_recalibrated, the detection scores)" : "");
}

const char* last_error_message() { return last_error; }

void set_cancel_flag(const int32_t* flag) { cancel_flag = flag; }

void stop_if_cancelled() {
    // another thread sets the flag while this one computes: an atomic load, so none is torn or hoisted
    if (cancel_flag && __atomic_load_n(cancel_flag, __ATOMIC_RELAXED) != 0) throw Cancelled();
}

}  // namespace dynseg
