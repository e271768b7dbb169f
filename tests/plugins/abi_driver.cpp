// abi_driver.cpp: the C ABI (dynseg_crf.h) called from C++ alone, on the paths that succeed and the
// paths that fail: every CPU entry point, on the main thread and on short-lived threads, and where a
// CUDA device is there (or the CPU emulation of one, tests/cuda_emulation) the CUDA entry points.
//
// Python can't look for leaks in the library it loads (CPython keeps memory alive until exit, so
// LeakSanitizer is off under it); this program can. scripts/cpu_sanitizers.sh builds it against the
// AddressSanitizer builds of the library and of its CUDA emulation and runs it with leak detection
// on; tests/plugins/test_abi_driver.py and tests/cuda_emulation/test_emulated_kernels.py build and
// run it against the installed and the emulated library, so it stays correct. It prints what failed
// and a count, and exits 1 if any status or result was not the expected one.
//
//   g++ -std=c++17 -I plugins/include tests/plugins/abi_driver.cpp -L<dir> -ldynseg_crf -pthread
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "dynseg_crf.h"

namespace {

std::atomic<int> checks{0}, failures{0};

void expect(bool ok, const char* what) {
    ++checks;
    if (ok) return;
    ++failures;
    std::printf("FAIL %s\n", what);
}

// A status and, for a failure, a message that contains `names` (the field at fault).
void expect_status(dynseg_status got, dynseg_status wanted, const char* what, const char* names = "") {
    const char* message = dynseg_last_error();
    const bool ok = got == wanted && (got == DYNSEG_OK || (*message && std::strstr(message, names)));
    expect(ok, what);
    if (!ok) std::printf("     status %d (wanted %d), message \"%s\" (wanted it to name \"%s\")\n", got, wanted,
                         message, names);
}

// A problem of L labels over an H x W image with a spatial and a bilateral kernel, its arrays owned.
struct Problem {
    int64_t labels, height, width;
    std::vector<float> image, unary, compat, matrix_weight;
    float spatial_weight = 3.0f;
    dynseg_kernel kernels[2]{};
    dynseg_crf_problem c{};

    Problem(int64_t labels_, int64_t height_, int64_t width_, uint32_t seed)
        : labels(labels_), height(height_), width(width_), image(3 * height_ * width_),
          unary(labels_ * height_ * width_), compat(labels_ * labels_), matrix_weight(labels_ * labels_) {
        std::mt19937 random(seed);
        std::uniform_real_distribution<float> colour(0.0f, 255.0f), logit(-2.0f, 2.0f), entry(0.0f, 1.0f);
        for (float& v : image) v = colour(random);
        for (float& v : unary) v = logit(random);
        for (float& v : compat) v = entry(random);
        for (float& v : matrix_weight) v = entry(random);
        kernels[0] = {3.0f, 0.0f, DYNSEG_WEIGHT_SCALAR, &spatial_weight};
        kernels[1] = {20.0f, 13.0f, DYNSEG_WEIGHT_MATRIX, matrix_weight.data()};
        c.num_labels = labels;
        c.height = height;
        c.width = width;
        c.image_channels = 3;
        c.image = image.data();
        c.num_kernels = 2;
        c.kernels = kernels;
        c.compat_kind = DYNSEG_COMPAT_FULL;
        c.compat = compat.data();
        c.normalization = DYNSEG_NORMALIZE_SYMMETRIC;
        c.iterations = 3;
        c.output = DYNSEG_OUTPUT_LOGITS;
        c.threads = 2;
    }
    Problem(const Problem&) = delete;  // c points into this object's own arrays
    Problem& operator=(const Problem&) = delete;
    int64_t size() const { return labels * height * width; }
};

std::vector<char> workspace_for(const dynseg_crf_problem& problem, int32_t pass) {
    size_t bytes = 0;
    expect_status(dynseg_crf_workspace_size(&problem, pass, &bytes), DYNSEG_OK, "workspace size");
    return std::vector<char>(bytes);
}

bool all_finite(const std::vector<float>& values) {
    for (float v : values)
        if (!std::isfinite(v)) return false;
    return true;
}

void forward_backward_and_filter(uint32_t seed) {
    Problem p(5, 17, 23, seed);
    std::vector<float> out(p.size());
    std::vector<char> ws = workspace_for(p.c, DYNSEG_PASS_FORWARD);
    expect_status(dynseg_crf_forward(&p.c, p.unary.data(), out.data(), ws.data(), ws.size()), DYNSEG_OK, "forward");
    expect(all_finite(out), "forward: finite logits");

    p.c.output = DYNSEG_OUTPUT_PROBABILITIES;
    p.c.normalization = DYNSEG_NORMALIZE_AFTER;
    expect_status(dynseg_crf_forward(&p.c, p.unary.data(), out.data(), ws.data(), ws.size()), DYNSEG_OK,
                  "forward: probabilities");
    double worst = 0.0;
    for (int64_t pixel = 0; pixel < p.height * p.width; ++pixel) {
        double total = 0.0;
        for (int64_t l = 0; l < p.labels; ++l) total += out[l * p.height * p.width + pixel];
        worst = std::fmax(worst, std::fabs(total - 1.0));
    }
    expect(worst < 1e-5, "forward: probabilities sum to 1 at every pixel");

    p.c.output = DYNSEG_OUTPUT_LOGITS;
    std::vector<char> backward_ws = workspace_for(p.c, DYNSEG_PASS_BACKWARD);
    std::vector<float> grad_logits(p.size(), 0.25f), grad_unary(p.size()), grad_spatial(1),
        grad_matrix(p.labels * p.labels), grad_compat(p.labels * p.labels);
    float* grad_weights[2] = {grad_spatial.data(), grad_matrix.data()};
    expect_status(dynseg_crf_backward(&p.c, p.unary.data(), grad_logits.data(), grad_unary.data(), grad_weights,
                                      grad_compat.data(), backward_ws.data(), backward_ws.size()),
                  DYNSEG_OK, "backward");
    expect(all_finite(grad_unary) && all_finite(grad_matrix) && all_finite(grad_compat), "backward: finite gradients");

    std::vector<float> filtered(2 * p.height * p.width);
    for (int32_t transpose = 0; transpose < 2; ++transpose)
        expect_status(dynseg_lattice_filter(&p.c, 1, 2, p.unary.data(), filtered.data(), transpose, ws.data(),
                                            ws.size()),
                      DYNSEG_OK, transpose ? "lattice filter, transposed" : "lattice filter");
}

void detection_potential() {
    Problem p(3, 12, 16, 7);
    p.c.compat_kind = DYNSEG_COMPAT_POTTS;
    p.c.compat = nullptr;
    const float boxes[] = {1, 1, 8, 6, 4, 3, 14, 11}, scores[] = {0.9f, 0.4f}, x = 2.0f, y = 1.0f;
    const int64_t labels[] = {1, 2};
    float recalibrated[2] = {-1.0f, -1.0f};
    dynseg_detections d{2, boxes, labels, scores, &x, &y, 1.0f, 1e-4f, recalibrated};
    p.c.detections = &d;
    std::vector<float> out(p.size());
    std::vector<char> ws = workspace_for(p.c, DYNSEG_PASS_FORWARD);
    expect_status(dynseg_crf_forward(&p.c, p.unary.data(), out.data(), ws.data(), ws.size()), DYNSEG_OK,
                  "forward with detections");
    expect(recalibrated[0] > 0.0f && recalibrated[0] < 1.0f && recalibrated[1] > 0.0f && recalibrated[1] < 1.0f,
           "forward with detections: recalibrated scores are probabilities");
    // the backward pass differentiates the potential too: w_x and w_y get gradients
    const float grad_recalibrated[] = {1.0f, -0.5f};
    float grad_x = NAN, grad_y = NAN;
    d.grad_recalibrated = grad_recalibrated;
    d.grad_detection_x = &grad_x;
    d.grad_detection_y = &grad_y;
    std::vector<float> grad(p.size());
    std::vector<char> backward_ws = workspace_for(p.c, DYNSEG_PASS_BACKWARD);
    expect_status(dynseg_crf_backward(&p.c, p.unary.data(), out.data(), grad.data(), nullptr, nullptr,
                                      backward_ws.data(), backward_ws.size()),
                  DYNSEG_OK, "backward with detections");
    expect(std::isfinite(grad_x) && std::isfinite(grad_y) && grad_x != 0.0f && grad_y != 0.0f,
           "backward with detections: gradients of w_x and w_y");

    // every iteration reads the scores: recalibrated scores written over them would change the result
    float shared[4] = {0.9f, 0.4f, 0.0f, 0.0f};  // two scores, then room for two recalibrated ones
    d.scores = shared;
    for (float* recalibrated_in : {shared, shared + 1}) {
        d.recalibrated = recalibrated_in;
        expect_status(dynseg_crf_forward(&p.c, p.unary.data(), out.data(), ws.data(), ws.size()),
                      DYNSEG_ERROR_INVALID_ARGUMENT, "refused: recalibrated scores over the scores",
                      "detections->recalibrated overlaps detections->scores");
        size_t bytes = 0;  // a size query reads no array: the TensorRT plugin passes one placeholder for all
        expect_status(dynseg_crf_workspace_size(&p.c, DYNSEG_PASS_FORWARD, &bytes), DYNSEG_OK,
                      "a size query with the recalibrated scores over the scores");
    }
    expect(shared[0] == 0.9f && shared[1] == 0.4f, "refused: the scores are left as they were");
    d.recalibrated = shared + 2;  // right after the scores: no overlap
    expect_status(dynseg_crf_forward(&p.c, p.unary.data(), out.data(), ws.data(), ws.size()), DYNSEG_OK,
                  "forward with recalibrated scores just past the scores");

    // nor may they be written over anything else an iteration reads after writing them: over the labels,
    // which index the logits, the next iteration would write out of bounds
    int64_t labels_in[2] = {1, 2};
    float boxes_in[8], x_in[2] = {x, 0.0f}, y_in[2] = {y, 0.0f};
    std::copy(boxes, boxes + 8, boxes_in);
    d.scores = scores;
    d.labels = labels_in;
    d.boxes = boxes_in;
    d.detection_x = x_in;
    d.detection_y = y_in;
    const struct {
        float* recalibrated;
        const char* input;
    } aliases[] = {{reinterpret_cast<float*>(labels_in), "detections->labels"},
                   {reinterpret_cast<float*>(labels_in) + 2, "detections->labels"},
                   {boxes_in + 6, "detections->boxes"},
                   {x_in, "detections->detection_x"},
                   {y_in, "detections->detection_y"}};
    for (const auto& alias : aliases) {
        d.recalibrated = alias.recalibrated;
        expect_status(dynseg_crf_forward(&p.c, p.unary.data(), out.data(), ws.data(), ws.size()),
                      DYNSEG_ERROR_INVALID_ARGUMENT, "refused: recalibrated scores over an input read after them",
                      (std::string("detections->recalibrated overlaps ") + alias.input).c_str());
    }
    expect(labels_in[0] == 1 && labels_in[1] == 2 && x_in[0] == x, "refused: the inputs are left as they were");
    // grad_recalibrated is read by the backward pass only, after it has recomputed the recalibrated scores
    float shared_grad[2] = {1.0f, -0.5f};
    d.recalibrated = shared_grad;
    d.grad_recalibrated = shared_grad;
    expect_status(dynseg_crf_backward(&p.c, p.unary.data(), out.data(), grad.data(), nullptr, nullptr,
                                      backward_ws.data(), backward_ws.size()),
                  DYNSEG_ERROR_INVALID_ARGUMENT, "refused: backward with recalibrated over grad_recalibrated",
                  "detections->recalibrated overlaps detections->grad_recalibrated");
    expect_status(dynseg_crf_forward(&p.c, p.unary.data(), out.data(), ws.data(), ws.size()), DYNSEG_OK,
                  "forward, which does not read grad_recalibrated, with recalibrated over it");
    d.recalibrated = recalibrated;
    d.labels = nullptr;
    expect_status(dynseg_crf_forward(&p.c, p.unary.data(), out.data(), ws.data(), ws.size()),
                  DYNSEG_ERROR_INVALID_ARGUMENT, "refused: no detection labels", "detections->labels is NULL");
}

// Each refusal must come back as a status with a message, and nothing it set up may stay allocated.
void refusals() {
    Problem p(4, 9, 11, 3);
    std::vector<float> out(p.size());
    std::vector<char> ws = workspace_for(p.c, DYNSEG_PASS_FORWARD);
    size_t bytes = 0;
    expect_status(dynseg_crf_workspace_size(nullptr, DYNSEG_PASS_FORWARD, &bytes), DYNSEG_ERROR_INVALID_ARGUMENT,
                  "refused: no problem", "problem");
    expect_status(dynseg_crf_workspace_size(&p.c, 7, &bytes), DYNSEG_ERROR_INVALID_ARGUMENT, "refused: unknown pass",
                  "pass");

    Problem bad(4, 9, 11, 3);  // p's twin, spoiled one field at a time
    bad.c.num_labels = 0;
    expect_status(dynseg_crf_forward(&bad.c, p.unary.data(), out.data(), ws.data(), ws.size()),
                  DYNSEG_ERROR_INVALID_ARGUMENT, "refused: no labels", "num_labels");
    bad.c.num_labels = p.labels;
    bad.kernels[0].theta_xy = 0.0f;
    expect_status(dynseg_crf_forward(&bad.c, p.unary.data(), out.data(), ws.data(), ws.size()),
                  DYNSEG_ERROR_INVALID_ARGUMENT, "refused: theta_xy 0", "kernels[0].theta_xy");
    bad.kernels[0].theta_xy = 3.0f;
    bad.image[5] = NAN;
    expect_status(dynseg_crf_forward(&bad.c, p.unary.data(), out.data(), ws.data(), ws.size()),
                  DYNSEG_ERROR_INVALID_ARGUMENT, "refused: a NaN in the image", "image");
    bad.image[5] = 0.0f;
    bad.kernels[1].theta_color = 1e-30f;  // scaled colours far beyond what float keys resolve
    expect_status(dynseg_crf_forward(&bad.c, p.unary.data(), out.data(), ws.data(), ws.size()),
                  DYNSEG_ERROR_KEY_RANGE, "refused: a lattice that cannot be built", "theta_color = 1e-30");
    expect_status(dynseg_crf_forward(&p.c, p.unary.data(), out.data(), ws.data(), ws.size() / 2),
                  DYNSEG_ERROR_WORKSPACE_TOO_SMALL, "refused: half the workspace", "workspace");
    expect_status(dynseg_lattice_filter(&p.c, 2, 1, p.unary.data(), out.data(), 0, ws.data(), ws.size()),
                  DYNSEG_ERROR_INVALID_ARGUMENT, "refused: filter with a kernel the problem lacks", "kernel");
    // a NULL pointer is named alone, whichever it is
    expect_status(dynseg_crf_forward(&p.c, p.unary.data(), nullptr, ws.data(), ws.size()),
                  DYNSEG_ERROR_INVALID_ARGUMENT, "refused: no out", "out is NULL");
    expect_status(dynseg_crf_backward(&p.c, p.unary.data(), out.data(), out.data(), nullptr, nullptr, nullptr,
                                      ws.size()),
                  DYNSEG_ERROR_INVALID_ARGUMENT, "refused: a backward without workspace", "workspace is NULL");
    bad.kernels[1].theta_color = 13.0f;
    bad.c.image_channels = 0;
    expect_status(dynseg_crf_forward(&bad.c, p.unary.data(), out.data(), ws.data(), ws.size()),
                  DYNSEG_ERROR_INVALID_ARGUMENT, "refused: an image of no channels", "image_channels is 0");
    bad.c.image_channels = 3;

    const int32_t cancelled = 1;
    dynseg_set_cancel_flag(&cancelled);
    expect_status(dynseg_crf_forward(&p.c, p.unary.data(), out.data(), ws.data(), ws.size()), DYNSEG_ERROR_CANCELLED,
                  "refused: a cancelled call", "cancel");
    dynseg_set_cancel_flag(nullptr);

    const dynseg_status cuda = dynseg_crf_workspace_size_cuda(&p.c, DYNSEG_PASS_FORWARD, &bytes);
    expect(dynseg_cuda_compiled() ? cuda == DYNSEG_OK || cuda == DYNSEG_ERROR_CUDA : cuda == DYNSEG_ERROR_NOT_SUPPORTED,
           "CUDA workspace query: sized, no device, or not built");
    if (cuda == DYNSEG_ERROR_CUDA)  // the reason there is no device, not how sizing failed without one
        expect_status(cuda, DYNSEG_ERROR_CUDA, "CUDA workspace query without a device", "cudaGetDeviceCount failed");
    if (dynseg_cuda_compiled())
        expect_status(dynseg_cuda_free(nullptr), DYNSEG_OK, "CUDA free of NULL: nothing to do, device or not");
    expect(dynseg_cuda_compiled() ? std::strncmp(dynseg_cuda_build(), "CUDA ", 5) == 0 : *dynseg_cuda_build() == 0,
           "the CUDA build names its runtime, or is empty without CUDA");
}

// Device memory through the C ABI's own allocator, so this program needs no CUDA headers.
class DeviceBuffer {
public:
    explicit DeviceBuffer(size_t bytes) {
        expect_status(dynseg_cuda_malloc(bytes, &pointer_), DYNSEG_OK, "CUDA malloc");
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    ~DeviceBuffer() { dynseg_cuda_free(pointer_); }
    template <typename T>
    T* holding(const std::vector<T>& values) {
        expect_status(dynseg_cuda_memcpy(pointer_, values.data(), values.size() * sizeof(T)), DYNSEG_OK,
                      "CUDA copy to the device");
        return static_cast<T*>(pointer_);
    }
    void* get() const { return pointer_; }

private:
    void* pointer_ = nullptr;
};

float largest_difference(const std::vector<float>& a, const std::vector<float>& b) {
    float largest = 0.0f;
    for (size_t i = 0; i < a.size(); ++i) largest = std::fmax(largest, std::fabs(a[i] - b[i]));
    return largest;
}

// The CUDA entry points, on a GPU or on the CPU emulation of one (tests/cuda_emulation): their host
// side allocates device memory (the host-array call) and must free it on the paths that fail too.
void cuda_paths() {
    Problem p(5, 17, 23, 21);
    std::vector<float> cpu(p.size()), gpu(p.size());
    std::vector<char> ws = workspace_for(p.c, DYNSEG_PASS_FORWARD);
    expect_status(dynseg_crf_forward(&p.c, p.unary.data(), cpu.data(), ws.data(), ws.size()), DYNSEG_OK, "forward");
    expect_status(dynseg_crf_forward_cuda_from_host(&p.c, p.unary.data(), gpu.data(), 0), DYNSEG_OK,
                  "CUDA forward from host arrays");
    expect(largest_difference(cpu, gpu) < 1e-4f, "CUDA forward from host arrays: the CPU's logits");
    expect_status(dynseg_crf_forward_cuda_from_host(&p.c, p.unary.data(), gpu.data(), 99),
                  DYNSEG_ERROR_INVALID_ARGUMENT, "refused: CUDA device 99", "device");
    std::vector<float> nan_unary = p.unary;
    nan_unary[7] = std::nanf("");
    expect_status(dynseg_crf_forward_cuda_from_host(&p.c, nan_unary.data(), gpu.data(), 0),
                  DYNSEG_ERROR_INVALID_ARGUMENT, "refused: CUDA forward from a host unary holding NaN",
                  "unary holds a non-finite value");
    Problem spoiled(5, 17, 23, 21);
    spoiled.kernels[1].theta_color = 1e-30f;
    expect_status(dynseg_crf_forward_cuda_from_host(&spoiled.c, p.unary.data(), gpu.data(), 0),
                  DYNSEG_ERROR_KEY_RANGE, "refused: CUDA forward from host arrays of a lattice that cannot be built",
                  "lattice");

    // the same problem with every array in device memory, on a stream of its own
    DeviceBuffer image(p.image.size() * 4), spatial(4), bilateral(p.matrix_weight.size() * 4),
        compat(p.compat.size() * 4), unary(p.unary.size() * 4), out(gpu.size() * 4);
    dynseg_kernel kernels[2] = {p.kernels[0], p.kernels[1]};
    kernels[0].weight = spatial.holding(std::vector<float>{p.spatial_weight});
    kernels[1].weight = bilateral.holding(p.matrix_weight);
    dynseg_crf_problem on_device = p.c;
    on_device.image = image.holding(p.image);
    on_device.kernels = kernels;
    on_device.compat = compat.holding(p.compat);
    size_t bytes = 0;
    expect_status(dynseg_crf_workspace_size_cuda(&on_device, DYNSEG_PASS_FORWARD, &bytes), DYNSEG_OK,
                  "CUDA workspace size");
    DeviceBuffer workspace(bytes);
    void* stream = nullptr;
    expect_status(dynseg_cuda_stream_create(&stream), DYNSEG_OK, "CUDA stream");
    const float* d_unary = unary.holding(p.unary);
    float* d_out = static_cast<float*>(out.get());
    expect_status(dynseg_crf_forward_cuda(&on_device, d_unary, d_out, workspace.get(), bytes, stream), DYNSEG_OK,
                  "CUDA forward");
    expect_status(dynseg_crf_check_cuda(workspace.get(), stream), DYNSEG_OK, "CUDA forward: lattices built");
    expect_status(dynseg_cuda_memcpy(gpu.data(), d_out, gpu.size() * 4), DYNSEG_OK, "CUDA copy to the host");
    expect(largest_difference(cpu, gpu) < 1e-4f, "CUDA forward: the CPU's logits");
    expect_status(dynseg_crf_forward_cuda(&on_device, d_unary, d_out, workspace.get(), bytes / 2, stream),
                  DYNSEG_ERROR_WORKSPACE_TOO_SMALL, "refused: CUDA forward in half the workspace", "workspace");
    kernels[1].theta_color = 1e-30f;  // found only on the device: the call enqueues, the check reports
    expect_status(dynseg_crf_forward_cuda(&on_device, d_unary, d_out, workspace.get(), bytes, stream), DYNSEG_OK,
                  "CUDA forward of a lattice that cannot be built: enqueued");
    expect_status(dynseg_crf_check_cuda(workspace.get(), stream), DYNSEG_ERROR_KEY_RANGE,
                  "refused: CUDA forward of a lattice that cannot be built, by the check", "lattice");
    expect_status(dynseg_cuda_stream_destroy(stream), DYNSEG_OK, "CUDA stream destroyed");
}

}  // namespace

int main() {
    std::printf("dynseg %s, ABI %d, %d threads\n", dynseg_version(), dynseg_abi_version(), dynseg_max_threads());
    expect(dynseg_abi_version() == DYNSEG_ABI_VERSION, "the library's ABI is this header's");
    expect(std::strlen(dynseg_cpu_missing()) == 0, "the CPU has every extension the kernels use");
    forward_backward_and_filter(1);
    detection_potential();
    refusals();
    // Threads that call, fail and end: each leaves a last-error message and a cancel flag behind.
    std::vector<std::thread> threads;
    for (uint32_t seed = 10; seed < 14; ++seed)
        threads.emplace_back([seed] {
            forward_backward_and_filter(seed);
            refusals();
        });
    for (std::thread& t : threads) t.join();
    if (dynseg_cuda_device_count() > 0) {
        cuda_paths();
        std::printf("the CUDA entry points were called too\n");
    }
    std::printf("%d checks, %d failed\n", checks.load(), failures.load());
    return failures ? 1 : 0;
}
