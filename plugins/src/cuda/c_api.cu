// c_api.cu: the CUDA entry points of dynseg_crf.h. Validation and error messages are the CPU
// boundary's (boundary.h); this file adds what only the GPU needs: the launch geometry of the current
// device, CUDA error reporting, the after-the-fact lattice check, and the host-array convenience call.
#include <atomic>
#include <cfloat>
#include <cstdio>
#include <cstring>
#include <vector>

#include "../boundary.h"
#include "dynseg_crf.h"
#include "meanfield.cuh"

namespace {

using dynseg::fail;
using dynseg::guarded;
using dynseg::Workspace;

dynseg_status cuda_failed(cudaError_t error, const char* what) {
    return fail(DYNSEG_ERROR_CUDA, "%s failed: %s (%s)", what, cudaGetErrorName(error), cudaGetErrorString(error));
}

// guarded, with a CUDA failure thrown from the kernels' host code reported as the CUDA error it is
template <typename Body>
dynseg_status guarded_cuda(const Body& body) {
    return guarded([&]() -> dynseg_status {
        try {
            return body();
        } catch (const dynseg::cuda::CudaError& e) {
            return cuda_failed(e.code, e.what());
        }
    });
}

// The CUDA runtime linked in (static), as messages name it: 13000 is "13.0".
constexpr int kRuntimeMajor = CUDART_VERSION / 1000, kRuntimeMinor = CUDART_VERSION % 1000 / 10;

// The number of CUDA devices; where the runtime cannot count them, DYNSEG_ERROR_CUDA saying why (no
// driver and a driver too old look alike to the runtime).
dynseg_status count_devices(int* count) {
    *count = 0;
    if (cudaError_t e = cudaGetDeviceCount(count)) {
        cudaGetLastError();
        *count = 0;
        return fail(DYNSEG_ERROR_CUDA, "cudaGetDeviceCount failed: %s (%s); the library carries the CUDA %d.%d "
                    "runtime, which needs an NVIDIA driver at least as new", cudaGetErrorName(e),
                    cudaGetErrorString(e), kRuntimeMajor, kRuntimeMinor);
    }
    return DYNSEG_OK;
}

// Whether `device` names one of the CUDA devices: count_devices' error when there are none to name.
dynseg_status check_device(int32_t device) {
    int count = 0;
    if (dynseg_status s = count_devices(&count)) return s;
    if (device < 0 || device >= count)
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "device must name one of the %d CUDA devices, got %d", count,
                    device);
    return DYNSEG_OK;
}

#ifndef DYNSEG_CUDA_ARCHITECTURES_BUILT
#error "plugins/CMakeLists.txt defines DYNSEG_CUDA_ARCHITECTURES_BUILT, the architectures compiled, for messages"
#endif

// Whether `device` (the current one) can run this build's kernels. A GPU the build has neither SASS
// nor usable PTX for would otherwise fail at the first launch with a bare "no kernel image". Asked
// once per device: the answer cannot change while the process lives.
dynseg_status check_kernels_run_on(int device) {
    constexpr int kRemembered = 64;
    static std::atomic<bool> runs[kRemembered] = {};
    const bool remembered = device >= 0 && device < kRemembered;
    if (remembered && runs[device].load(std::memory_order_relaxed)) return DYNSEG_OK;
    const cudaError_t e = dynseg::cuda::kernel_image_status();
    if (e == cudaSuccess) {
        if (remembered) runs[device].store(true, std::memory_order_relaxed);
        return DYNSEG_OK;
    }
    cudaGetLastError();  // not sticky: clear it for the caller's next CUDA call
    if (e != cudaErrorNoKernelImageForDevice && e != cudaErrorInvalidDeviceFunction &&
        e != cudaErrorUnsupportedPtxVersion)
        return cuda_failed(e, "cudaFuncGetAttributes");
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    return fail(DYNSEG_ERROR_NOT_SUPPORTED,
                "CUDA device %d (compute capability %d.%d) cannot run this library's CUDA kernels, which were "
                "built for %s (%s): reinstall dynseg with its architecture, e.g. pip install . -C "
                "cmake.define.DYNSEG_CUDA_ARCHITECTURES=%d%d-real",
                device, major, minor, DYNSEG_CUDA_ARCHITECTURES_BUILT, cudaGetErrorName(e), major, minor);
}

// Grid-stride launches get enough blocks to fill every SM of the current device.
dynseg_status current_launch(void* stream, dynseg::cuda::Launch* launch) {
    int device = 0, sms = 0;
    if (cudaError_t e = cudaGetDevice(&device)) return cuda_failed(e, "cudaGetDevice");
    if (dynseg_status s = check_kernels_run_on(device)) return s;
    if (cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device))
        return cuda_failed(e, "cudaDeviceGetAttribute");
    launch->stream = static_cast<cudaStream_t>(stream);
    launch->blocks_cap = std::max(1, sms) * 8;
    return DYNSEG_OK;
}

dynseg_status check_cuda_limits(const dynseg_crf_problem* problem) {
    // The kernels index with 32 bits (CUB's item counts are 32-bit too): every lattice's entries times
    // a label tile, every pixels x labels array and, where a matrix weight or a full compatibility
    // makes them L x L, the parameters and their gradients must stay below 2^31.
    bool square = problem->compat_kind == DYNSEG_COMPAT_FULL;
    for (int32_t k = 0; k < problem->num_kernels; ++k)
        square = square || dynseg::is_matrix(problem->kernels[k]);
    if (square && problem->num_labels * problem->num_labels > INT32_MAX)
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "num_labels must be at most 46340 for the CUDA kernels with a "
                    "matrix weight or a full compatibility (L x L must stay below 2^31), got %lld",
                    (long long)problem->num_labels);
    const int64_t pixels = problem->height * problem->width;
    const int64_t entries = pixels * (2 + problem->image_channels + 1);
    const int64_t row = dynseg::cuda::padded_to_float4(problem->num_labels);
    if ((entries + 1) * dynseg::kLabelTile > INT32_MAX || pixels * row > INT32_MAX)
        return fail(DYNSEG_ERROR_INVALID_ARGUMENT,
                    "a %lldx%lld image with %lld labels and %lld colour channels is too large for the CUDA kernels "
                    "(pixels x labels and pixels x (channels + 3) x 32 must stay below 2^31)",
                    (long long)problem->height, (long long)problem->width, (long long)problem->num_labels,
                    (long long)problem->image_channels);
    return DYNSEG_OK;
}

// The problem's checks that need no array read (device memory cannot be), then the CUDA kernels' limits.
dynseg_status check_arguments(const dynseg_crf_problem* problem) {
    if (dynseg_status s = dynseg::validate(problem, /*read_arrays=*/false)) return s;
    return check_cuda_limits(problem);
}

// Lays the problem out in the caller's workspace and enqueues body on it.
template <typename Body>
dynseg_status with_mean_field(const dynseg_crf_problem& problem, int pass, void* workspace, size_t bytes, void* stream,
                              const Body& body) {
    dynseg::cuda::Launch launch;
    if (dynseg_status s = current_launch(stream, &launch)) return s;
    Workspace ws(workspace, bytes);
    ws.align_base();
    dynseg::cuda::MeanField crf(problem, pass, ws);
    if (dynseg_status s = dynseg::check_workspace(ws, bytes, "dynseg_crf_workspace_size_cuda")) return s;
    cudaGetLastError();  // a stale launch error of someone else's is not ours to report
    body(crf, launch);
    if (cudaError_t e = cudaGetLastError()) return cuda_failed(e, "a dynseg CUDA kernel launch");
    return DYNSEG_OK;
}

// Frees device memory on every way out of the host-array convenience call.
struct DeviceArrays {
    std::vector<void*> pointers;
    ~DeviceArrays() {
        for (void* p : pointers) cudaFree(p);
    }
    template <typename T>
    dynseg_status allocate(int64_t count, T** device) {
        void* p = nullptr;
        if (cudaError_t e = cudaMalloc(&p, count * sizeof(T))) return cuda_failed(e, "cudaMalloc");
        pointers.push_back(p);
        *device = static_cast<T*>(p);
        return DYNSEG_OK;
    }
    template <typename T>
    dynseg_status copy(const T* host, int64_t count, T** device) {
        *device = nullptr;
        if (!host) return DYNSEG_OK;
        if (dynseg_status s = allocate(count, device)) return s;
        if (cudaError_t e = cudaMemcpy(*device, host, count * sizeof(T), cudaMemcpyHostToDevice))
            return cuda_failed(e, "cudaMemcpy to the device");
        return DYNSEG_OK;
    }
};

}  // namespace

extern "C" {

int32_t dynseg_cuda_compiled(void) { return 1; }

const char* dynseg_cuda_build(void) {
    static const char* const text = [] {
        static char buffer[sizeof(DYNSEG_CUDA_ARCHITECTURES_BUILT) + 64];
        std::snprintf(buffer, sizeof(buffer), "CUDA %d.%d runtime, architectures %s", kRuntimeMajor, kRuntimeMinor,
                      DYNSEG_CUDA_ARCHITECTURES_BUILT);
        return buffer;
    }();
    return text;
}

int32_t dynseg_cuda_device_count(void) {
    int count = 0;
    return count_devices(&count) == DYNSEG_OK ? count : 0;
}

dynseg_status dynseg_crf_workspace_size_cuda(const dynseg_crf_problem* problem, int32_t pass, size_t* bytes) {
    return guarded_cuda([&] {
        if (dynseg_status s = check_arguments(problem)) return s;
        if (dynseg_status s = dynseg::check_size_query(pass, bytes)) return s;
        // the size is the current device's: without a device, say why rather than how CUB failed to size its sort
        int devices = 0;
        if (dynseg_status s = count_devices(&devices)) return s;
        Workspace counter;
        dynseg::cuda::MeanField plan(*problem, pass, counter);
        *bytes = counter.used();
        return DYNSEG_OK;
    });
}

dynseg_status dynseg_crf_forward_cuda(const dynseg_crf_problem* problem, const float* unary, float* out,
                                      void* workspace, size_t workspace_bytes, void* stream) {
    return guarded_cuda([&] {
        if (dynseg_status s = check_arguments(problem)) return s;
        if (dynseg_status s = dynseg::check_not_null({{"unary", unary}, {"out", out}, {"workspace", workspace}}))
            return s;
        if (dynseg_status s = dynseg::check_outputs_apart(*problem, DYNSEG_PASS_FORWARD)) return s;
        return with_mean_field(*problem, DYNSEG_PASS_FORWARD, workspace, workspace_bytes, stream,
                               [&](dynseg::cuda::MeanField& crf, const dynseg::cuda::Launch& launch) {
                                   crf.forward(unary, out, launch);
                               });
    });
}

dynseg_status dynseg_crf_backward_cuda(const dynseg_crf_problem* problem, const float* unary,
                                       const float* grad_logits, float* grad_unary, float* const* grad_weights,
                                       float* grad_compat, void* workspace, size_t workspace_bytes, void* stream) {
    return guarded_cuda([&] {
        if (dynseg_status s = check_arguments(problem)) return s;
        if (dynseg_status s = dynseg::backward_supported(*problem)) return s;
        if (dynseg_status s = dynseg::check_not_null({{"unary", unary}, {"grad_logits", grad_logits},
                                                      {"grad_unary", grad_unary}, {"workspace", workspace}}))
            return s;
        if (dynseg_status s = dynseg::check_outputs_apart(*problem, DYNSEG_PASS_BACKWARD)) return s;
        return with_mean_field(*problem, DYNSEG_PASS_BACKWARD, workspace, workspace_bytes, stream,
                               [&](dynseg::cuda::MeanField& crf, const dynseg::cuda::Launch& launch) {
                                   crf.backward(unary, grad_logits, grad_unary, grad_weights, grad_compat, launch);
                               });
    });
}

dynseg_status dynseg_crf_check_cuda(const void* workspace, void* stream) {
    return guarded_cuda([&] {
        if (!workspace) return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "workspace is NULL");
        // where MeanField took it: the first array of the aligned workspace
        Workspace ws(const_cast<void*>(workspace), sizeof(dynseg::cuda::Status) + 64);
        ws.align_base();
        const auto* status = ws.take<dynseg::cuda::Status>(1);
        dynseg::cuda::Status host{};
        auto s = static_cast<cudaStream_t>(stream);
        if (cudaError_t e = cudaMemcpyAsync(&host, status, sizeof(host), cudaMemcpyDeviceToHost, s))
            return cuda_failed(e, "cudaMemcpyAsync of the status");
        if (cudaError_t e = cudaStreamSynchronize(s)) return cuda_failed(e, "the dynseg CUDA kernels");
        if (host.code == dynseg::cuda::kFeaturesTooLarge)
            return fail(DYNSEG_ERROR_KEY_RANGE,
                        "lattice coordinates out of range for kernels[%d]: scaled features reach %g, beyond what "
                        "float lattice keys resolve; its theta_xy or theta_color is too small for the image%s",
                        host.kernel, host.largest,
                        host.largest <= FLT_MAX ? "" : " (or the image in device memory holds infinity)");
        if (host.code == dynseg::cuda::kKeysTooWide)
            return fail(DYNSEG_ERROR_KEY_RANGE,
                        "lattice keys of kernels[%d] need %d bits but only 63 fit a 64-bit key: the features span too "
                        "wide a range; larger thetas or fewer colour channels narrow it",
                        host.kernel, host.bits);
        if (host.nonfinite)
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT,
                        "the results hold NaN or infinity: an input in device memory was not valid (a non-finite "
                        "value, a negative detection score, a label out of range or a box outside the image; the "
                        "CUDA calls cannot check device memory before they run), or finite inputs too large "
                        "together overflowed float32 during mean field (scale down the unary, grad_logits, the "
                        "kernel weights, the compatibility or the detection scores)");
        return DYNSEG_OK;
    });
}

dynseg_status dynseg_crf_forward_cuda_from_host(const dynseg_crf_problem* problem, const float* unary, float* out,
                                                int32_t device) {
    return guarded_cuda([&] {
        if (dynseg_status s = dynseg::validate(problem, /*read_arrays=*/true)) return s;
        if (dynseg_status s = check_cuda_limits(problem)) return s;  // before gigabytes are copied over
        if (dynseg_status s = dynseg::check_not_null({{"unary", unary}, {"out", out}})) return s;
        if (dynseg_status s = dynseg::check_outputs_apart(*problem, DYNSEG_PASS_FORWARD)) return s;
        // host memory here, so checked as the CPU call checks it
        if (!dynseg::all_finite(unary, problem->num_labels * problem->height * problem->width))
            return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "unary holds a non-finite value");
        if (dynseg_status s = check_device(device)) return s;
        int previous = 0;
        cudaGetDevice(&previous);
        if (cudaError_t e = cudaSetDevice(device)) return cuda_failed(e, "cudaSetDevice");
        struct Restore {
            int device;
            ~Restore() { cudaSetDevice(device); }
        } restore{previous};

        const int64_t L = problem->num_labels, N = problem->height * problem->width;
        DeviceArrays arrays;
        dynseg_crf_problem on_device = *problem;
        dynseg_kernel kernels[DYNSEG_MAX_KERNELS];
        float* image = nullptr;
        if (dynseg_status s = arrays.copy(problem->image, problem->image_channels * N, &image)) return s;
        on_device.image = image;
        for (int k = 0; k < problem->num_kernels; ++k) {
            kernels[k] = problem->kernels[k];
            float* weight = nullptr;
            const int64_t count = dynseg::weight_count(kernels[k], L);
            if (dynseg_status s = arrays.copy(kernels[k].weight, count, &weight)) return s;
            kernels[k].weight = weight;
        }
        on_device.kernels = kernels;
        float* compat = nullptr;
        if (problem->compat_kind != DYNSEG_COMPAT_POTTS) {
            const int64_t count = dynseg::compat_count(problem->compat_kind, L);
            if (dynseg_status s = arrays.copy(problem->compat, count, &compat)) return s;
        }
        on_device.compat = compat;
        dynseg_detections detections{};
        float* recalibrated_host = nullptr;
        if (problem->detections && problem->detections->count > 0) {  // count 0: its fields are not read
            // the arrays go to the device; the recalibrated scores come back after the call
            detections = *problem->detections;
            const dynseg_detections& d = *problem->detections;
            const int64_t D = d.count;
            float *boxes = nullptr, *scores = nullptr, *x = nullptr, *y = nullptr;
            int64_t* labels = nullptr;
            if (dynseg_status s = arrays.copy(d.boxes, 4 * D, &boxes)) return s;
            if (dynseg_status s = arrays.copy(d.labels, D, &labels)) return s;
            if (dynseg_status s = arrays.copy(d.scores, D, &scores)) return s;
            if (dynseg_status s = arrays.copy(d.detection_x, 1, &x)) return s;
            if (dynseg_status s = arrays.copy(d.detection_y, 1, &y)) return s;
            detections.boxes = boxes;
            detections.labels = labels;
            detections.scores = scores;
            detections.detection_x = x;
            detections.detection_y = y;
            recalibrated_host = d.recalibrated;  // an output: a device buffer, copied back after the call
            detections.recalibrated = nullptr;
            detections.grad_recalibrated = nullptr;  // the backward's fields: host pointers, never read here
            detections.grad_detection_x = detections.grad_detection_y = nullptr;
            if (recalibrated_host)
                if (dynseg_status s = arrays.allocate(D, &detections.recalibrated)) return s;
            on_device.detections = &detections;
        }
        float* d_unary = nullptr;
        if (dynseg_status s = arrays.copy(unary, L * N, &d_unary)) return s;
        float* d_out = nullptr;
        if (cudaError_t e = cudaMalloc(reinterpret_cast<void**>(&d_out), L * N * sizeof(float)))
            return cuda_failed(e, "cudaMalloc");
        arrays.pointers.push_back(d_out);
        size_t bytes = 0;
        if (dynseg_status s = dynseg_crf_workspace_size_cuda(&on_device, DYNSEG_PASS_FORWARD, &bytes)) return s;
        void* workspace = nullptr;
        if (cudaError_t e = cudaMalloc(&workspace, bytes)) return cuda_failed(e, "cudaMalloc of the workspace");
        arrays.pointers.push_back(workspace);
        if (dynseg_status s = dynseg_crf_forward_cuda(&on_device, d_unary, d_out, workspace, bytes, nullptr)) return s;
        // results that hold NaN or infinity are named below, from the host copy, as the CPU call names them
        const dynseg_status checked = dynseg_crf_check_cuda(workspace, nullptr);
        if (checked != DYNSEG_OK && checked != DYNSEG_ERROR_INVALID_ARGUMENT) return checked;
        if (cudaError_t e = cudaMemcpy(out, d_out, L * N * sizeof(float), cudaMemcpyDeviceToHost))
            return cuda_failed(e, "cudaMemcpy to the host");
        if (recalibrated_host && detections.count > 0)
            if (cudaError_t e = cudaMemcpy(recalibrated_host, detections.recalibrated, detections.count * sizeof(float),
                                           cudaMemcpyDeviceToHost))
                return cuda_failed(e, "cudaMemcpy to the host");
        return dynseg::check_forward_outputs(*problem, out);  // the results are on the host here
    });
}

dynseg_status dynseg_cuda_set_device(int32_t device) {
    return guarded_cuda([&] {
        if (dynseg_status s = check_device(device)) return s;
        if (cudaError_t e = cudaSetDevice(device)) return cuda_failed(e, "cudaSetDevice");
        return DYNSEG_OK;
    });
}

dynseg_status dynseg_cuda_get_device(int32_t* device) {
    return guarded_cuda([&] {
        if (!device) return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "device is NULL");
        int current = 0;
        if (cudaError_t e = cudaGetDevice(&current)) return cuda_failed(e, "cudaGetDevice");
        *device = current;
        return DYNSEG_OK;
    });
}

dynseg_status dynseg_cuda_malloc(size_t bytes, void** pointer) {
    return guarded_cuda([&] {
        if (!pointer) return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "pointer is NULL");
        *pointer = nullptr;
        if (cudaError_t e = cudaMalloc(pointer, bytes)) return cuda_failed(e, "cudaMalloc");
        return DYNSEG_OK;
    });
}

dynseg_status dynseg_cuda_free(void* pointer) {
    return guarded_cuda([&] {
        if (!pointer) return DYNSEG_OK;  // as free(NULL), even where no CUDA runtime can start
        if (cudaError_t e = cudaFree(pointer)) return cuda_failed(e, "cudaFree");
        return DYNSEG_OK;
    });
}

dynseg_status dynseg_cuda_memcpy(void* destination, const void* source, size_t bytes) {
    return guarded_cuda([&] {
        if (dynseg_status s = dynseg::check_not_null({{"destination", destination}, {"source", source}})) return s;
        if (cudaError_t e = cudaMemcpy(destination, source, bytes, cudaMemcpyDefault)) return cuda_failed(e, "cudaMemcpy");
        // cudaMemcpy may return before a copy from pageable memory, or within the device, has landed;
        // a caller's work on a non-blocking stream would not wait for it. Wait here, as documented.
        if (cudaError_t e = cudaStreamSynchronize(0)) return cuda_failed(e, "cudaStreamSynchronize");
        return DYNSEG_OK;
    });
}

dynseg_status dynseg_cuda_stream_create(void** stream) {
    return guarded_cuda([&] {
        if (!stream) return fail(DYNSEG_ERROR_INVALID_ARGUMENT, "stream is NULL");
        cudaStream_t created = nullptr;
        if (cudaError_t e = cudaStreamCreateWithFlags(&created, cudaStreamNonBlocking))
            return cuda_failed(e, "cudaStreamCreateWithFlags");
        *stream = created;
        return DYNSEG_OK;
    });
}

dynseg_status dynseg_cuda_stream_synchronize(void* stream) {
    return guarded_cuda([&] {
        if (cudaError_t e = cudaStreamSynchronize(static_cast<cudaStream_t>(stream)))
            return cuda_failed(e, "cudaStreamSynchronize");
        return DYNSEG_OK;
    });
}

dynseg_status dynseg_cuda_stream_destroy(void* stream) {
    return guarded_cuda([&] {
        if (cudaError_t e = cudaStreamDestroy(static_cast<cudaStream_t>(stream))) return cuda_failed(e, "cudaStreamDestroy");
        return DYNSEG_OK;
    });
}

}  // extern "C"
