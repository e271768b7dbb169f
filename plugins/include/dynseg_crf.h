/*
 * dynseg_crf.h: the C ABI of dynseg's dense mean-field CRF kernel library.
 *
 * One header for every caller: Python (ctypes over numpy buffers, dynseg/sdk/_native.py), the torch
 * custom op (dynseg/trainer/crf/native.py) and the TensorRT plugin. Everything crosses the boundary as
 * plain C types; every compute, size and CUDA call returns a dynseg_status, the queries (version, ABI,
 * CPU features, last error, threads, CUDA build and devices) return their value, and none aborts the
 * process. On failure, dynseg_last_error() returns a message (per thread) that names the offending field
 * and value.
 *
 * The model (docs/crf.md has the maths):
 *
 *   Q^0 = softmax(U)                                        U: unary logits, (L, H, W)
 *   for t = 1..T:
 *       m   = sum_k W_k . Knorm_k(Q^{t-1})                  W_k: scalar or (L, L) kernel weight
 *       L^t = U - mu . m  [+ Det(B^{t-1})]                  mu: compatibility, (L, L)
 *       Q^t = softmax(L^t)
 *   output L^T (logits)
 *
 * Knorm_k is kernel k's Gaussian filter (permutohedral lattice over the features
 * (x/theta_xy, y/theta_xy[, c_1/theta_color, ..., c_C/theta_color]), x = column) normalised "after"
 * (K(Q) / K(1)) or "symmetric" (K(1)^-1/2 K(K(1)^-1/2 Q)). The label count L is a run-time value.
 * Det is the optional detection potential over the D detections, B their beliefs (dynseg_detections below).
 *
 * Layouts: every per-pixel array is planar and row-major, (channels, H, W), float32, contiguous.
 * Determinism: results are bitwise identical run to run and for any thread count.
 * Threads: the calls are reentrant; each call uses up to `threads` threads (0 = all cores).
 * CUDA: the *_cuda entry points run the same model on a GPU (see the CUDA section below).
 */
#ifndef DYNSEG_CRF_H
#define DYNSEG_CRF_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define DYNSEG_API __declspec(dllexport)
#else
#define DYNSEG_API __attribute__((visibility("default")))
#endif

#define DYNSEG_ABI_VERSION 6

typedef enum dynseg_status {
    DYNSEG_OK = 0,
    DYNSEG_ERROR_INVALID_ARGUMENT = 1, /* a field is out of range; see dynseg_last_error() */
    DYNSEG_ERROR_WORKSPACE_TOO_SMALL = 2, /* fewer bytes than the call needs (the workspace-size query's
                                             answer, less the alignment room it did not use) */
    DYNSEG_ERROR_KEY_RANGE = 3, /* the lattice cannot be built: a scaled feature times 2d reaches 2^22,
                                   where float keys have no fraction bits left, or the coordinates need
                                   more than 63 key bits; the message says which */
    DYNSEG_ERROR_INTERNAL = 4, /* out of host memory, or a bug in dynseg; the message says which */
    DYNSEG_ERROR_NOT_SUPPORTED = 5, /* CUDA entry point of a library built without CUDA, or for a GPU
                                       it has no kernels for (its architecture was not compiled) */
    DYNSEG_ERROR_CUDA = 6,          /* a CUDA runtime call failed; the message names it */
    DYNSEG_ERROR_CANCELLED = 7      /* the calling thread's cancel flag was set (dynseg_set_cancel_flag) */
} dynseg_status;

typedef enum dynseg_normalization {
    DYNSEG_NORMALIZE_AFTER = 0,    /* K(Q) / K(1): CRF-as-RNN, the paper's network */
    DYNSEG_NORMALIZE_SYMMETRIC = 1 /* K(1)^-1/2 K(K(1)^-1/2 Q): densecrf's default */
} dynseg_normalization;

typedef enum dynseg_weight_kind {
    DYNSEG_WEIGHT_SCALAR = 0, /* one value shared by all labels (label-agnostic) */
    DYNSEG_WEIGHT_MATRIX = 1  /* (L, L) row-major: m_a = sum_b W[a][b] Knorm(Q)_b */
} dynseg_weight_kind;

typedef enum dynseg_compat_kind {
    DYNSEG_COMPAT_POTTS = 0,    /* mu = -I: a positive kernel weight rewards agreeing labels */
    DYNSEG_COMPAT_DIAGONAL = 1, /* mu = diag(compat), L values */
    DYNSEG_COMPAT_FULL = 2      /* mu = compat, (L, L) row-major */
} dynseg_compat_kind;

#define DYNSEG_MAX_KERNELS 8
#define DYNSEG_MAX_LABELS 65536      /* keeps the backward pass's L x L sums far from overflow */
#define DYNSEG_MAX_PIXELS 134217727     /* H x W <= (2^31 - 1) / 16: a lattice's (d+1)·H·W entries index
                                           with 32 bits */
#define DYNSEG_MAX_DETECTIONS 536870911 /* D <= (2^31 - 1) / 4: the (D, 4) boxes index with 32 bits */
#define DYNSEG_MAX_COLOR_CHANNELS 13 /* feature dimension d = 2 + C <= 15; whether an image's keys fit
                                        64 bits depends on its range and theta: beyond 5 full-range
                                        channels they rarely do (docs/crf.md, section 4) */

typedef enum dynseg_output {
    DYNSEG_OUTPUT_LOGITS = 0,       /* L^T, what the network and the backward pass use */
    DYNSEG_OUTPUT_PROBABILITIES = 1 /* Q^T = softmax(L^T), what pydensecrf's inference returns */
} dynseg_output;

/* One Gaussian kernel. theta_color == 0 makes a spatial kernel (features x, y only). In the paper's
 * terms: a spatial kernel's theta_xy is θγ (`theta_spatial` in the models and the ONNX node,
 * `spatial[0]` in dense_crf); a bilateral kernel's theta_xy is θα (`theta_bilateral_xy`,
 * `bilateral[0]`) and its theta_color θβ (`theta_bilateral_rgb`, `bilateral[1]`). */
typedef struct dynseg_kernel {
    float theta_xy;            /* > 0, pixels */
    float theta_color;         /* 0 (spatial) or > 0, in the image's units */
    int32_t weight_kind;       /* dynseg_weight_kind */
    const float* weight;       /* 1 or L*L values */
} dynseg_kernel;

/* The higher-order detection potential of the semantic CRF (docs/ops.md, "With it"; Arnab et al.,
 * ECCV 2016). Detection d has a box F_d of n_d pixels, a label l_d, a score s_d, the prior
 * p_d = min(s_d / s_max, 1 - epsilon) and a belief B_d = (Q(Y_d = 0), Q(Y_d = 1)), (1 - p_d, p_d) before the
 * first iteration. Iteration t, from Q = Q^{t-1} and the belief iteration t-1 left:
 *   on the pixels of F_d:  every label  -x_d B_d(1),  label l_d also  x_d (B_d(1) - B_d(0)),
 *   with x_d = w_x s_d, added detection by detection in index order; then the belief iteration t+1 reads:
 *   A_d = sum over F_d of Q(l_d),  y_d = w_y s_d / n_d,
 *   B_d = softmax over {0, 1} of  a_0 = (1 - p_d) - y_d A_d,  a_1 = p_d - y_d (n_d - A_d).
 * The backward calls differentiate it too: the gradient reaches the unary through every iteration's
 * term, and w_x and w_y; the scores (the detector's) are constants. */
typedef struct dynseg_detections {
    int64_t count;              /* 0 <= D <= DYNSEG_MAX_DETECTIONS, and D x (T + 1) x 16 < 2^63 (the
                                   backward pass keeps every iteration's beliefs and box sums) */
    const float* boxes;         /* (D, 4) x1, y1, x2, y2: columns x1..x2 and rows y1..y2 inclusive, at least
                                   one pixel of them inside the image (the part outside is ignored) */
    const int64_t* labels;      /* (D,) l_d in 0..L-1 */
    const float* scores;        /* (D,) s_d, finite and >= 0 */
    const float* detection_x;   /* one value: w_x */
    const float* detection_y;   /* one value: w_y */
    float score_ceiling;        /* s_max > 0 */
    float epsilon;              /* 0 <= epsilon < 1 */
    float* recalibrated;        /* (D,) output, or NULL: Q(Y_d = 1) of the last iteration (s_d when T = 0);
                                   must not overlap scores, boxes, labels, detection_x, detection_y
                                   or grad_recalibrated, which every iteration reads after writing it
                                   (refused: INVALID_ARGUMENT). The backward calls, which recompute
                                   the forward pass, write it too */
    /* Read by the backward calls only: */
    const float* grad_recalibrated; /* (D,) dLoss/d recalibrated, or NULL: zero */
    float* grad_detection_x;    /* one value: dLoss/dw_x, or NULL: not wanted */
    float* grad_detection_y;    /* one value: dLoss/dw_y, or NULL: not wanted */
} dynseg_detections;

typedef struct dynseg_crf_problem {
    int64_t num_labels;            /* L: 1 <= L <= DYNSEG_MAX_LABELS */
    int64_t height, width;         /* H, W >= 1, H x W <= DYNSEG_MAX_PIXELS, and
                                      L x H x W x (T + 8) x 8 < 2^63 (the workspace size stays exact) */
    int64_t image_channels;        /* C >= 0 colour channels of `image` */
    const float* image;            /* (C, H, W); may be NULL when no kernel has theta_color > 0 */
    int32_t num_kernels;           /* 0..DYNSEG_MAX_KERNELS */
    const dynseg_kernel* kernels;  /* num_kernels entries */
    int32_t compat_kind;           /* dynseg_compat_kind */
    const float* compat;           /* NULL for Potts, else L or L*L values */
    int32_t normalization;         /* dynseg_normalization */
    int32_t iterations;            /* T >= 0 */
    int32_t output;                /* dynseg_output: what dynseg_crf_forward writes */
    int32_t threads;               /* 0 = all cores, else at most this many */
    const dynseg_detections* detections; /* NULL (or count 0, its other fields then unread): no detection
                                            potential */
} dynseg_crf_problem;

typedef enum dynseg_pass {
    DYNSEG_PASS_FORWARD = 0,
    DYNSEG_PASS_BACKWARD = 1
} dynseg_pass;

DYNSEG_API const char* dynseg_version(void);
DYNSEG_API int32_t dynseg_abi_version(void);
/* The instruction-set extensions this build's kernels use that the running CPU lacks, space-separated
 * ("" when it has them all). The CPU kernels are compiled for the building machine by default
 * (-march=native); a library copied to an older CPU must not be called but this. It runs on any
 * x86-64 CPU; other architectures answer "". */
DYNSEG_API const char* dynseg_cpu_missing(void);
/* The message of this thread's last failed call ("" if none). Valid until the next call. */
DYNSEG_API const char* dynseg_last_error(void);
/* Number of threads a call with threads = 0 uses. */
DYNSEG_API int32_t dynseg_max_threads(void);
/* Cancellation, for a caller that must be able to stop a long CPU call (an interactive program's
 * Ctrl-C). After this call, this thread's CPU compute calls read *flag, with a relaxed atomic load,
 * before each mean-field iteration (each one of the backward pass too); once another thread has made
 * it nonzero they stop and return DYNSEG_ERROR_CANCELLED, their outputs unspecified. NULL, each
 * thread's initial state, turns the checks off; the flag must outlive the calls that read it. The CUDA
 * calls ignore it: they return once their work is enqueued. */
DYNSEG_API void dynseg_set_cancel_flag(const int32_t* flag);

/* Bytes of workspace `pass` needs for `problem` in the worst case (every lattice at its largest,
 * (d+1)·H·W vertices); a size_t, which for the largest problems exceeds INT64_MAX. The memory is
 * touched only as far as the actual lattices reach, so on the CPU a lazily committed allocation costs
 * what is used. Any alignment will do: the size includes room for the library to align the pointer
 * itself. */
DYNSEG_API dynseg_status dynseg_crf_workspace_size(const dynseg_crf_problem* problem, int32_t pass,
                                                   size_t* bytes);

/* Mean-field inference: writes L^T or Q^T (problem->output), (L, H, W), to out. Inputs that are finite
 * but too large together for float32 (say, weights near FLT_MAX) overflow on the way: the call then
 * returns DYNSEG_ERROR_INVALID_ARGUMENT saying so, its NaN or infinite outputs written all the same. */
DYNSEG_API dynseg_status dynseg_crf_forward(const dynseg_crf_problem* problem, const float* unary,
                                            float* out, void* workspace, size_t workspace_bytes);

/* Gradients of a loss through dynseg_crf_forward with output = logits, given
 * grad_logits = dLoss/dL^T, (L, H, W), and with detections their grad_recalibrated (their
 * grad_detection_x and grad_detection_y receive the gradients of w_x and w_y).
 * Recomputes the forward pass. grad_unary: (L, H, W). grad_weights[k]: NULL (not wanted) or as many
 * values as kernels[k].weight. grad_compat: NULL or as many values as compat (ignored for Potts).
 * Gradients that overflow float32 are reported as dynseg_crf_forward's outputs are.
 * Outputs are overwritten, not accumulated. */
DYNSEG_API dynseg_status dynseg_crf_backward(const dynseg_crf_problem* problem, const float* unary,
                                             const float* grad_logits, float* grad_unary,
                                             float* const* grad_weights, float* grad_compat,
                                             void* workspace, size_t workspace_bytes);

/* The raw (unnormalised) Gaussian filter of problem->kernels[kernel] applied to values (channels, H, W):
 * out = K(values), or its transpose K^T(values) (blur axes in reverse order) when transpose != 0.
 * Uses the kernel's theta_xy / theta_color and the problem's image, size and threads; channels must be
 * in 1..num_labels, values finite, and out is refused (INVALID_ARGUMENT) when it overflows float32.
 * Workspace: dynseg_crf_workspace_size(problem, DYNSEG_PASS_FORWARD). */
DYNSEG_API dynseg_status dynseg_lattice_filter(const dynseg_crf_problem* problem, int32_t kernel,
                                               int64_t channels, const float* values, float* out,
                                               int32_t transpose, void* workspace,
                                               size_t workspace_bytes);

/* ---- CUDA ------------------------------------------------------------------------------------
 * The same computations on the GPU, for callers that hold device memory (the torch op, the
 * TensorRT plugin, onnxruntime's CUDA path). In these calls every array is a device pointer on the
 * current device: problem->image, kernels[k].weight, problem->compat, unary, out, the gradients and
 * the workspace, and the arrays of problem->detections. The problem struct, its kernels array and its
 * dynseg_detections struct stay in host memory; problem->threads is ignored. `stream` is a
 * cudaStream_t (NULL: the legacy default stream).
 *
 * The compute calls only enqueue work on `stream`: no allocation, no synchronisation, no copy
 * between host and device, so a TensorRT plugin can call them from enqueue. They validate every
 * host-side field as the CPU calls do, but cannot read device memory: non-finite values propagate
 * as NaN instead of being rejected (a detection's label out of range or negative score makes its
 * score and its box's logits NaN, a box without a pixel in the image its score), and a lattice that
 * cannot be built (features beyond what float keys resolve, or keys wider than 63 bits: absurdly small
 * thetas) fills its outputs (logits and scores) with NaN. dynseg_crf_check_cuda reports either after
 * the fact. With a matrix weight or a full compatibility the CUDA calls take at most 46340 labels
 * (their L x L arrays index with 32 bits); Potts and diagonal problems take every L the CPU calls do.
 * They also index pixels with 32 bits: H x W x (L rounded up to a multiple of 4) and
 * (H x W x (C + 3) + 1) x 32 must stay below 2^31 (about 11 M pixels for an RGB image).
 * Results are bitwise identical run to run (no floating-point atomics) and agree with the CPU
 * calls to float rounding. Without CUDA in the build every call returns DYNSEG_ERROR_NOT_SUPPORTED.
 */

/* 1 if the library was built with its CUDA kernels, else 0. */
DYNSEG_API int32_t dynseg_cuda_compiled(void);
/* What the CUDA kernels were built for, e.g. "CUDA 13.0 runtime, architectures 80-real, 90-real,
 * 90-virtual" (CMake's names: -real is machine code for that GPU, -virtual PTX the driver compiles for
 * newer ones); "" without CUDA in the build. Static storage. */
DYNSEG_API const char* dynseg_cuda_build(void);
/* Number of usable CUDA devices (0 without CUDA in the build, without a driver or without a GPU; where
 * the CUDA runtime failed to count them, a driver older than the runtime say, dynseg_last_error() then
 * names its error). */
DYNSEG_API int32_t dynseg_cuda_device_count(void);

/* Bytes of device workspace the CUDA calls of `pass` need for `problem` (the worst case: every lattice
 * at (d+1)·H·W vertices), including room to align the caller's pointer. The size depends on the
 * current CUDA device (its sort and scan storage), so one must be usable: DYNSEG_ERROR_CUDA otherwise. */
DYNSEG_API dynseg_status dynseg_crf_workspace_size_cuda(const dynseg_crf_problem* problem, int32_t pass,
                                                        size_t* bytes);

/* dynseg_crf_forward on the GPU. */
DYNSEG_API dynseg_status dynseg_crf_forward_cuda(const dynseg_crf_problem* problem, const float* unary,
                                                 float* out, void* workspace, size_t workspace_bytes,
                                                 void* stream);

/* dynseg_crf_backward on the GPU. grad_weights is a host array of num_kernels device pointers (or NULL
 * entries); the parameter gradients are reduced in double in a fixed order. */
DYNSEG_API dynseg_status dynseg_crf_backward_cuda(const dynseg_crf_problem* problem, const float* unary,
                                                  const float* grad_logits, float* grad_unary,
                                                  float* const* grad_weights, float* grad_compat,
                                                  void* workspace, size_t workspace_bytes, void* stream);

/* Waits for `stream`, then reports how the last CUDA call that used `workspace` went (a call that returned
 * an error used none: check after one that returned DYNSEG_OK, else it reads what was there): DYNSEG_OK;
 * DYNSEG_ERROR_KEY_RANGE with a message if it could not build a lattice; DYNSEG_ERROR_INVALID_ARGUMENT
 * if a result it wrote (logits, probabilities, recalibrated scores or gradients) holds NaN or infinity,
 * from device inputs it could not check or an overflow. Call it outside latency-critical paths (it
 * synchronises); the Python front ends call it after every call. */
DYNSEG_API dynseg_status dynseg_crf_check_cuda(const void* workspace, void* stream);

/* Convenience for callers with host arrays (the numpy API): copies the problem's arrays and `unary` to
 * device `device`, runs dynseg_crf_forward_cuda, copies the result into `out` (host) and frees
 * everything. Synchronous; allocates. Reports outputs that overflowed float32 as dynseg_crf_forward does.
 * A device that is not one of dynseg_cuda_device_count's is INVALID_ARGUMENT; where the runtime cannot
 * count devices (no driver), DYNSEG_ERROR_CUDA with its reason. */
DYNSEG_API dynseg_status dynseg_crf_forward_cuda_from_host(const dynseg_crf_problem* problem,
                                                           const float* unary, float* out, int32_t device);

/* Makes `device` the calling thread's current CUDA device (cudaSetDevice), for callers without a CUDA
 * binding of their own (the SDK's onnxruntime CUDA path on cuda:N). Errors as the host-array call's. */
DYNSEG_API dynseg_status dynseg_cuda_set_device(int32_t device);
/* The calling thread's current CUDA device (cudaGetDevice), for callers that keep per-device state
 * (the SDK's zero-copy entry reuses a workspace per device). */
DYNSEG_API dynseg_status dynseg_cuda_get_device(int32_t* device);

/* Device memory for callers without an allocator of their own (the SDK's CudaArray, the onnxruntime
 * CUDA path's workspace, the TensorRT backend's buffers). Freeing NULL does nothing, as free(NULL). */
DYNSEG_API dynseg_status dynseg_cuda_malloc(size_t bytes, void** pointer);
DYNSEG_API dynseg_status dynseg_cuda_free(void* pointer);
/* Copies bytes between any two of host and device memory; returns once the copy has landed, so work
 * on any stream, non-blocking ones included, sees it. */
DYNSEG_API dynseg_status dynseg_cuda_memcpy(void* destination, const void* source, size_t bytes);
/* A CUDA stream of the caller's own (non-blocking), for callers without a CUDA binding (the SDK's
 * TensorRT backend); its handle is a cudaStream_t. */
DYNSEG_API dynseg_status dynseg_cuda_stream_create(void** stream);
DYNSEG_API dynseg_status dynseg_cuda_stream_synchronize(void* stream);
DYNSEG_API dynseg_status dynseg_cuda_stream_destroy(void* stream);

#ifdef __cplusplus
}
#endif

#endif /* DYNSEG_CRF_H */
