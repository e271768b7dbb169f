// The dynseg::MeanFieldCRF TensorRT plugin (see mean_field_crf_plugin.h) and the library's entry points.
#include "mean_field_crf_plugin.h"

#include "dynseg_crf.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <new>
#include <sstream>
#include <utility>

#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#endif

using namespace nvinfer1;

namespace dynseg {
namespace tensorrt {
namespace {

// ---- the running TensorRT: its major version must be the headers' ------------------------------------------

// The version getInferLibVersion reports (major * 10000 + minor * 100 + patch) for the libnvinfer loaded in
// this process, or -1 where none is found. Found among the loaded objects rather than linked, so that the
// library loads without TensorRT; looked up through each libnvinfer* object's own handle because Python's
// tensorrt module loads libnvinfer with local symbols, which dlsym(RTLD_DEFAULT) cannot see.
int32_t running_tensorrt_version() noexcept {
#if defined(__linux__)
    std::vector<std::string> candidates;
    // No exception may unwind through the C library's frames: a failed push_back stops the walk instead.
    int const stopped = dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* out) -> int {
            char const* path = info->dlpi_name != nullptr ? info->dlpi_name : "";
            char const* slash = std::strrchr(path, '/');
            if (std::strncmp(slash != nullptr ? slash + 1 : path, "libnvinfer", 10) != 0) return 0;
            try {
                static_cast<std::vector<std::string>*>(out)->push_back(path);
                return 0;
            } catch (...) {
                return 1;
            }
        },
        &candidates);
    if (stopped != 0) return -1;
    for (std::string const& path : candidates) {
        void* handle = dlopen(path.c_str(), RTLD_LAZY | RTLD_NOLOAD);
        if (handle == nullptr) continue;
        auto version = reinterpret_cast<int32_t (*)()>(dlsym(handle, "getInferLibVersion"));
        int32_t const found = version != nullptr ? version() : -1;
        dlclose(handle);
        if (found >= 0) return found;
    }
#endif
    return -1;
}

// Empty when the running TensorRT (if any is found) has the headers' major version, else why the library
// must not serve it: the plugin interfaces differ in layout between major versions (ILoggerFinder gained
// a base class in 11), so a mismatched library would crash TensorRT rather than fail.
std::string const& version_mismatch() noexcept {
    static std::string const mismatch = []() -> std::string {
        try {
            int32_t const running = running_tensorrt_version();
            if (running < 0) return {};
            // major * 10000 + minor * 100 + patch since TensorRT 10, major * 1000 + minor * 100 + patch before
            int32_t const scale = running >= 100000 ? 10000 : 1000;
            int32_t const major = running / scale;
            if (major == NV_TENSORRT_MAJOR) return {};
            return "dynseg::MeanFieldCRF: this plugin library was compiled against TensorRT " +
                   std::to_string(NV_TENSORRT_MAJOR) + "'s headers but runs in TensorRT " + std::to_string(major) +
                   "." + std::to_string(running % scale / 100) + "." + std::to_string(running % 100) +
                   "; it offers no plugin. Rebuild it against this TensorRT (TensorRT_ROOT, docs/tensorrt.md).";
        } catch (...) {
            return "dynseg::MeanFieldCRF: out of host memory while checking TensorRT's version";
        }
    }();
    return mismatch;
}

// ---- logging: through the logger TensorRT hands over with setLoggerFinder, else stderr ----------------

class LoggerFinder {
public:
    void set(ILoggerFinder* finder) {
        std::lock_guard<std::mutex> lock(mMutex);
        if (mFinder == nullptr && finder != nullptr) mFinder = finder;
    }
    ILogger* logger() {
        std::lock_guard<std::mutex> lock(mMutex);
        return mFinder != nullptr ? mFinder->findLogger() : nullptr;
    }

private:
    ILoggerFinder* mFinder = nullptr;
    std::mutex mMutex;
};

LoggerFinder gLoggerFinder;

// Never throws: a failed log is dropped, not turned into an abort.
void log(ILogger::Severity severity, std::string const& layer, std::string const& message) noexcept {
    try {
        std::string const text = "dynseg::MeanFieldCRF" + (layer.empty() ? std::string() : " (" + layer + ")") +
                                 ": " + message;
        if (ILogger* logger = gLoggerFinder.logger()) {
            logger->log(severity, text.c_str());
        } else if (severity <= ILogger::Severity::kWARNING) {
            std::fprintf(stderr, "%s\n", text.c_str());
        }
    } catch (...) {
    }
}

void log_error(std::string const& layer, std::string const& message) noexcept {
    log(ILogger::Severity::kERROR, layer, message);
}

// Runs an entry point's body; an exception becomes a logged error and `failure`.
template <typename T, typename Body>
T guarded(std::string const& layer, char const* where, T failure, Body const& body) noexcept {
    try {
        return body();
    } catch (std::bad_alloc const&) {
        log_error(layer, std::string(where) + ": out of host memory");
    } catch (std::exception const& e) {
        log_error(layer, std::string(where) + ": " + e.what());
    } catch (...) {
        log_error(layer, std::string(where) + ": unknown exception");
    }
    return failure;
}

// The product of dims, or -1 for a negative (unknown) extent or one that overflows.
int64_t volume(Dims const& dims) {
    int64_t v = 1;
    for (int32_t i = 0; i < dims.nbDims; ++i) {
        if (dims.d[i] < 0) return -1;
        if (dims.d[i] != 0 && v > std::numeric_limits<int64_t>::max() / dims.d[i]) return -1;
        v *= dims.d[i];
    }
    return v;
}

std::string dims_string(Dims const& dims) {
    std::ostringstream s;
    s << "(";
    for (int32_t i = 0; i < dims.nbDims; ++i) s << (i ? ", " : "") << dims.d[i];
    s << (dims.nbDims == 1 ? ",)" : ")");
    return s.str();
}

char const* const kInputNames[kNumInputs] = {"unary", "image", "spatial_weight", "bilateral_weight", "compatibility",
                                            "boxes", "labels", "scores", "detection_x", "detection_y"};

std::string weight_kind(Dims const& dims, int64_t labels, char const* name, int32_t* kind) {
    int64_t const v = volume(dims);
    if (v == 1) {
        *kind = DYNSEG_WEIGHT_SCALAR;
        return {};
    }
    if (dims.nbDims == 2 && dims.d[0] == labels && dims.d[1] == labels) {
        *kind = DYNSEG_WEIGHT_MATRIX;
        return {};
    }
    return std::string(name) + " must be a scalar or (L, L) = (" + std::to_string(labels) + ", " +
           std::to_string(labels) + "), got " + dims_string(dims);
}

// The problem struct for shapes with the given device arrays (dummy non-NULL pointers for sizing).
struct Problem {
    dynseg_kernel kernels[2];
    dynseg_detections detections;
    dynseg_crf_problem problem;
};

// The node's inputs as the library's problem: the detection potential rides along when the node has it
// (the library adds its term to every iteration; recalibrated scores go to `detection_scores`).
void fill_problem(CrfAttributes const& a, CrfShapes const& s, void const* const* inputs, float* detection_scores,
                  Problem* p) {
    auto in = [&](int32_t i) { return static_cast<float const*>(inputs[i]); };
    p->kernels[0] = dynseg_kernel{a.theta_spatial, 0.0f, s.spatial_kind, in(kSpatialWeight)};
    p->kernels[1] = dynseg_kernel{a.theta_bilateral_xy, a.theta_bilateral_rgb, s.bilateral_kind, in(kBilateralWeight)};
    dynseg_crf_problem& q = p->problem;
    std::memset(&q, 0, sizeof(q));
    q.num_labels = s.labels;
    q.height = s.height;
    q.width = s.width;
    q.image_channels = s.channels;
    q.image = in(kImage);
    q.num_kernels = 2;
    q.kernels = p->kernels;
    q.compat_kind = s.compat_kind;
    q.compat = s.compat_kind == DYNSEG_COMPAT_POTTS ? nullptr : in(kCompatibility);
    q.normalization = a.normalization == "symmetric" ? DYNSEG_NORMALIZE_SYMMETRIC : DYNSEG_NORMALIZE_AFTER;
    q.iterations = a.iterations;
    q.output = DYNSEG_OUTPUT_LOGITS;
    q.threads = 0;
    if (!a.detection_potential || s.detections == 0) return;
    dynseg_detections& d = p->detections;
    d = dynseg_detections{};  // the backward's fields stay NULL: a plugin only infers
    d.count = s.detections;
    d.boxes = in(kBoxes);
    d.labels = static_cast<int64_t const*>(inputs[kLabels]);
    d.scores = in(kScores);
    d.detection_x = in(kDetectionX);
    d.detection_y = in(kDetectionY);
    d.score_ceiling = a.score_ceiling;
    d.epsilon = a.epsilon;
    d.recalibrated = detection_scores;
    q.detections = &p->detections;
}

// L = 1 or T = 0: nothing to infer, the output is the unary and the scores pass through (docs/ops.md; the
// SDK's twin is nothing_to_infer in sdk/crf_node.py).
bool identity(CrfAttributes const& a, CrfShapes const& s) { return s.labels == 1 || a.iterations == 0; }

// The kernel library this process loaded (libdynseg_crf.so, found through $ORIGIN at load time): what a plan
// records at build time and checks at deserialisation, since neither TensorRT nor the sidecar pins it.
std::string kernel_library_identity() {
    return std::string(dynseg_version()) + " abi " + std::to_string(dynseg_abi_version());
}

std::string library_error(char const* call, dynseg_status status) {
    return std::string(call) + " failed (status " + std::to_string(static_cast<int>(status)) +
           "): " + dynseg_last_error();
}

// Whether TensorRT called `method` with the node's inputs and outputs (their counts, and arrays where
// `arrays`); if not, logs why, because TensorRT only reports that the call failed.
bool check_io(std::string const& layer, char const* method, int32_t nbInputs, int32_t nbOutputs, bool arrays) {
    if (nbInputs != kNumInputs || nbOutputs != kNumOutputs) {
        log_error(layer, std::string(method) + ": a MeanFieldCRF node has " + std::to_string(kNumInputs) +
                             " inputs and " + std::to_string(kNumOutputs) + " outputs, got " +
                             std::to_string(nbInputs) + " and " + std::to_string(nbOutputs));
        return false;
    }
    if (!arrays) {
        log_error(layer, std::string(method) + ": TensorRT passed no tensor array");
        return false;
    }
    return true;
}

// The kernel library's workspace for the profile's largest shapes (`in`'s max dims); false, logged after
// `context`, where they do not form a problem the kernels accept.
bool profile_workspace(std::string const& layer, char const* context, CrfAttributes const& attributes,
                       DynamicPluginTensorDesc const* in, size_t* bytes) {
    Dims const* dims[kNumInputs];
    for (int32_t i = 0; i < kNumInputs; ++i) dims[i] = &in[i].max;
    CrfShapes shapes;
    std::string error = read_shapes(dims, &shapes, /*bounds=*/true);
    if (error.empty()) error = workspace_size(attributes, shapes, bytes);
    if (error.empty()) return true;
    log_error(layer, context + error);
    return false;
}

// A device-to-device copy on the stream (nothing for 0 bytes); an empty string, else CUDA's error.
std::string copy_through(void* to, void const* from, size_t bytes, cudaStream_t stream) {
    if (bytes == 0) return {};
    cudaError_t const e = cudaMemcpyAsync(to, from, bytes, cudaMemcpyDeviceToDevice, stream);
    return e == cudaSuccess ? std::string() : std::string("cudaMemcpyAsync: ") + cudaGetErrorString(e);
}

// --- fields: each reader returns an empty string, else why the field cannot be read ---------------------

std::string unreadable(PluginField const& f) {
    return "has type " + std::to_string(static_cast<int32_t>(f.type)) + " and length " + std::to_string(f.length) +
           ", which it cannot be read from";
}

std::string read_int(PluginField const& f, int32_t* out) {
    if (f.data == nullptr || f.length < 1) return unreadable(f);
    if (f.type == PluginFieldType::kINT32) {
        *out = *static_cast<int32_t const*>(f.data);
        return {};
    }
    if (f.type == PluginFieldType::kINT64) {
        int64_t const v = *static_cast<int64_t const*>(f.data);
        // the type is fine: the value is what cannot be narrowed
        if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
            return "holds " + std::to_string(v) + ", which does not fit int32";
        *out = static_cast<int32_t>(v);
        return {};
    }
    return unreadable(f);
}

std::string read_float(PluginField const& f, float* out) {
    if (f.data == nullptr || f.length < 1) return unreadable(f);
    if (f.type == PluginFieldType::kFLOAT32) {
        *out = *static_cast<float const*>(f.data);
        return {};
    }
    if (f.type == PluginFieldType::kFLOAT64) {
        *out = static_cast<float>(*static_cast<double const*>(f.data));
        return {};
    }
    return unreadable(f);
}

std::string read_string(PluginField const& f, std::string* out) {
    if (f.type != PluginFieldType::kCHAR || f.data == nullptr || f.length < 0) return unreadable(f);
    char const* text = static_cast<char const*>(f.data);
    size_t const n = static_cast<size_t>(f.length);
    *out = std::string(text, std::find(text, text + n, '\0'));  // with or without the terminator
    return {};
}

// The fields only a plan carries: getFieldsToSerialize writes them, the creator does not list them (so
// TensorRT's ONNX parser never passes them), and only the runtime phase reads them back (read_plan).
bool plan_only(std::string const& field) { return field == "kernel_library" || field == "workspace_bytes"; }

// The plan-only fields of `fc` (a plan's, in the runtime phase); false, logged, where one is damaged or the
// plan was built with another kernel library.
bool read_plan(std::string const& layer, PluginFieldCollection const& fc, PlanRecord* plan) {
    for (int32_t i = 0; i < fc.nbFields; ++i) {
        PluginField const& f = fc.fields[i];
        std::string const field = f.name != nullptr ? f.name : "";
        if (field == "workspace_bytes") {
            if (f.type != PluginFieldType::kINT64 || f.data == nullptr || f.length != 1) {
                log_error(layer, "the field workspace_bytes must be one INT64");
                return false;
            }
            int64_t const bound = *static_cast<int64_t const*>(f.data);
            if (bound < 0) {  // damage, not "no bound"
                log_error(layer, "the field workspace_bytes must be >= 0, got " + std::to_string(bound));
                return false;
            }
            plan->workspace_bytes = bound;
            plan->workspace_recorded = true;
        } else if (field == "kernel_library" && !read_string(f, &plan->kernel_library).empty()) {
            log_error(layer, "the field kernel_library must be a CHAR string, got type " +
                                 std::to_string(static_cast<int32_t>(f.type)) + " and length " +
                                 std::to_string(f.length));
            return false;
        }
    }
    // empty: a plan of an older plugin, which did not record it
    if (!plan->kernel_library.empty() && plan->kernel_library != kernel_library_identity()) {
        log_error(layer, "the engine was built with the kernel library " + plan->kernel_library +
                             " but this process loaded " + kernel_library_identity() +
                             ": rebuild the engine with the installed dynseg");
        return false;
    }
    return true;
}

}  // namespace

std::string CrfAttributes::validate() const {
    std::ostringstream e;
    auto positive = [](float v) { return std::isfinite(v) && v > 0.0f; };
    if (iterations < 0) e << "iterations must be >= 0, got " << iterations;
    else if (!positive(theta_spatial)) e << "theta_spatial must be finite and > 0, got " << theta_spatial;
    else if (!positive(theta_bilateral_xy)) e << "theta_bilateral_xy must be finite and > 0, got " << theta_bilateral_xy;
    else if (!positive(theta_bilateral_rgb)) e << "theta_bilateral_rgb must be finite and > 0, got " << theta_bilateral_rgb;
    else if (normalization != "after" && normalization != "symmetric")
        e << "normalization must be \"after\" or \"symmetric\", got \"" << normalization << "\"";
    else if (detection_potential != 0 && detection_potential != 1)
        e << "detection_potential must be 0 or 1, got " << detection_potential;
    else if (detection_potential && !positive(score_ceiling))
        e << "score_ceiling must be finite and > 0, got " << score_ceiling;
    else if (detection_potential && !(std::isfinite(epsilon) && epsilon >= 0.0f && epsilon < 1.0f))
        e << "epsilon must be in [0, 1), got " << epsilon;
    return e.str();
}

std::string read_shapes(Dims const* const dims[kNumInputs], CrfShapes* shapes, bool bounds) {
    CrfShapes s;
    Dims const& unary = *dims[kUnary];
    if (unary.nbDims != 4 || unary.d[0] != 1 || unary.d[1] < 1 || unary.d[2] < 1 || unary.d[3] < 1)
        return "unary must be (1, L, H, W) with L, H, W >= 1, got " + dims_string(unary);
    s.labels = unary.d[1];
    s.height = unary.d[2];
    s.width = unary.d[3];
    Dims const& image = *dims[kImage];
    if (image.nbDims != 4 || image.d[0] != 1 || image.d[1] < 1 || image.d[1] > DYNSEG_MAX_COLOR_CHANNELS ||
        image.d[2] < 1 || image.d[3] < 1)
        return "image must be (1, C, H, W) with H, W >= 1 and 1 <= C <= " +
               std::to_string(DYNSEG_MAX_COLOR_CHANNELS) + ", got " + dims_string(image);
    if (bounds) {
        // at run time the unary and the image have the same H, W (checked below without bounds), so that
        // H, W is at most the tighter of the two bounds: sizing for the looser one only reserves more
        s.height = std::min(s.height, image.d[2]);
        s.width = std::min(s.width, image.d[3]);
    } else if (image.d[2] != s.height || image.d[3] != s.width) {
        return "image must have the unary's H, W = " + std::to_string(s.height) + ", " + std::to_string(s.width) +
               ", got " + dims_string(image);
    }
    s.channels = image.d[1];
    std::string error = weight_kind(*dims[kSpatialWeight], s.labels, "spatial_weight", &s.spatial_kind);
    if (error.empty()) error = weight_kind(*dims[kBilateralWeight], s.labels, "bilateral_weight", &s.bilateral_kind);
    if (!error.empty()) return error;
    Dims const& compat = *dims[kCompatibility];
    if (volume(compat) == 0) {
        s.compat_kind = DYNSEG_COMPAT_POTTS;
    } else if (compat.nbDims == 2 && compat.d[0] == s.labels && compat.d[1] == s.labels) {
        s.compat_kind = DYNSEG_COMPAT_FULL;
    } else {
        return "compatibility must be (L, L) = (" + std::to_string(s.labels) + ", " + std::to_string(s.labels) +
               ") or empty (Potts), got " + dims_string(compat);
    }
    Dims const& boxes = *dims[kBoxes];
    if (boxes.nbDims != 2 || boxes.d[0] < 0 || boxes.d[1] != 4) return "boxes must be (D, 4), got " + dims_string(boxes);
    s.detections = boxes.d[0];
    for (int32_t i : {int32_t(kLabels), int32_t(kScores)}) {
        Dims const& d = *dims[i];
        if (d.nbDims != 1 || d.d[0] != s.detections)
            return std::string(kInputNames[i]) + " must be (D,) with the boxes' D = " + std::to_string(s.detections) +
                   ", got " + dims_string(d);
    }
    for (int32_t i : {int32_t(kDetectionX), int32_t(kDetectionY)}) {
        if (volume(*dims[i]) != 1)
            return std::string(kInputNames[i]) + " must be a scalar, got " + dims_string(*dims[i]);
    }
    *shapes = s;
    return {};
}

std::string workspace_size(CrfAttributes const& a, CrfShapes const& s, size_t* bytes) {
    size_t size = 0;
    if (!identity(a, s)) {
        // sizing reads no array; the structs only need non-NULL pointers
        static float dummy[4] = {};
        static int64_t const dummy_label = 0;
        void const* inputs[kNumInputs];
        for (void const*& i : inputs) i = dummy;
        inputs[kLabels] = &dummy_label;
        Problem p;
        fill_problem(a, s, inputs, dummy, &p);
        dynseg_status const status = dynseg_crf_workspace_size_cuda(&p.problem, DYNSEG_PASS_FORWARD, &size);
        if (status != DYNSEG_OK) return library_error("dynseg_crf_workspace_size_cuda", status);
    }
    *bytes = size;
    return {};
}

// ---- the plugin ---------------------------------------------------------------------------------------

MeanFieldCrfPlugin::MeanFieldCrfPlugin(std::string layer_name, CrfAttributes attributes, PlanRecord plan)
    : mLayerName(std::move(layer_name)), mAttributes(std::move(attributes)), mWorkspaceBound(plan.workspace_bytes),
      mKernelLibrary(std::move(plan.kernel_library)),
      mWarnUnbounded(plan.workspace_recorded && plan.workspace_bytes == 0) {}

MeanFieldCrfPlugin::MeanFieldCrfPlugin(MeanFieldCrfPlugin const& other)
    : IPluginV3(), IPluginV3OneCore(), IPluginV3OneBuild(), IPluginV3OneRuntime(),
      mLayerName(other.mLayerName), mAttributes(other.mAttributes), mWorkspaceBound(other.mWorkspaceBound),
      mKernelLibrary(other.mKernelLibrary), mWarnUnbounded(other.mWarnUnbounded) {}

IPluginCapability* MeanFieldCrfPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
    switch (type) {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* MeanFieldCrfPlugin::clone() noexcept {
    return guarded<IPluginV3*>(mLayerName, "clone", nullptr, [&] { return new MeanFieldCrfPlugin(*this); });
}

char const* MeanFieldCrfPlugin::getPluginName() const noexcept { return kPluginName; }
char const* MeanFieldCrfPlugin::getPluginVersion() const noexcept { return kPluginVersion; }
char const* MeanFieldCrfPlugin::getPluginNamespace() const noexcept { return kPluginNamespace; }
int32_t MeanFieldCrfPlugin::getNbOutputs() const noexcept { return kNumOutputs; }

int32_t MeanFieldCrfPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                            DynamicPluginTensorDesc const* /* out */, int32_t nbOutputs) noexcept {
    return guarded<int32_t>(mLayerName, "configurePlugin", -1, [&]() -> int32_t {
        if (!check_io(mLayerName, "configurePlugin", nbInputs, nbOutputs, in != nullptr)) return -1;
        // The profile's largest shapes must form a problem the kernels accept (sizes, 32-bit indexing). The
        // smallest are not checked: TensorRT derives a plugin input's bounds from the profile and a lower
        // bound may be looser than any shape that runs; onShapeChange and enqueue check the actual shapes.
        size_t bytes = 0;
        if (!profile_workspace(mLayerName, "the profile's maximum shapes: ", mAttributes, in, &bytes)) return -1;
        mWorkspaceBound = std::max(mWorkspaceBound, static_cast<int64_t>(bytes));  // the largest of all profiles
        return 0;
    });
}

int32_t MeanFieldCrfPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                               int32_t nbInputs) const noexcept {
    return guarded<int32_t>(mLayerName, "getOutputDataTypes", -1, [&]() -> int32_t {
        if (!check_io(mLayerName, "getOutputDataTypes", nbInputs, nbOutputs,
                      outputTypes != nullptr && inputTypes != nullptr))
            return -1;
        // the first callback that sees the network's types: say which input is wrong, where the format
        // negotiation would only find no implementation
        for (int32_t i = 0; i < kNumInputs; ++i) {
            DataType const wanted = i == kLabels ? DataType::kINT64 : DataType::kFLOAT;
            if (inputTypes[i] != wanted) {
                log_error(mLayerName, std::string("input ") + kInputNames[i] + " must be " +
                                          (i == kLabels ? "int64" : "float32") + ", got TensorRT DataType " +
                                          std::to_string(static_cast<int32_t>(inputTypes[i])));
                return -1;
            }
        }
        outputTypes[kLogits] = DataType::kFLOAT;
        outputTypes[kDetectionScores] = DataType::kFLOAT;
        return 0;
    });
}

int32_t MeanFieldCrfPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /* shapeInputs */,
                                            int32_t /* nbShapeInputs */, DimsExprs* outputs, int32_t nbOutputs,
                                            IExprBuilder& /* exprBuilder */) noexcept {
    return guarded<int32_t>(mLayerName, "getOutputShapes", -1, [&]() -> int32_t {
        if (!check_io(mLayerName, "getOutputShapes", nbInputs, nbOutputs, inputs != nullptr && outputs != nullptr))
            return -1;
        if (inputs[kUnary].nbDims != 4 || inputs[kScores].nbDims != 1) {
            log_error(mLayerName, "unary must have 4 dimensions and scores 1, got " +
                                      std::to_string(inputs[kUnary].nbDims) + " and " +
                                      std::to_string(inputs[kScores].nbDims));
            return -1;
        }
        outputs[kLogits] = inputs[kUnary];             // (1, L, H, W)
        outputs[kDetectionScores] = inputs[kScores];   // (D,)
        return 0;
    });
}

bool MeanFieldCrfPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                                   int32_t nbOutputs) noexcept {
    if (inOut == nullptr || nbInputs != kNumInputs || nbOutputs != kNumOutputs || pos < 0 ||
        pos >= kNumInputs + kNumOutputs)
        return false;
    PluginTensorDesc const& desc = inOut[pos].desc;
    DataType const wanted = pos == kLabels ? DataType::kINT64 : DataType::kFLOAT;
    return desc.format == TensorFormat::kLINEAR && desc.type == wanted;
}

size_t MeanFieldCrfPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                                            DynamicPluginTensorDesc const* /* outputs */,
                                            int32_t nbOutputs) const noexcept {
    return guarded<size_t>(mLayerName, "getWorkspaceSize", 0, [&]() -> size_t {
        if (!check_io(mLayerName, "getWorkspaceSize", nbInputs, nbOutputs, inputs != nullptr)) return 0;
        size_t bytes = 0;
        if (!profile_workspace(mLayerName, "getWorkspaceSize for the profile's maximum shapes: ", mAttributes, inputs,
                               &bytes))
            return 0;
        mWorkspaceBound = std::max(mWorkspaceBound, static_cast<int64_t>(bytes));  // the largest of all profiles
        return bytes;
    });
}

int32_t MeanFieldCrfPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /* out */,
                                          int32_t nbOutputs) noexcept {
    return guarded<int32_t>(mLayerName, "onShapeChange", -1, [&]() -> int32_t {
        if (!check_io(mLayerName, "onShapeChange", nbInputs, nbOutputs, in != nullptr)) return -1;
        std::string const error = prepare(in);
        if (!error.empty()) {
            log_error(mLayerName, error);
            return -1;
        }
        return 0;
    });
}

int32_t MeanFieldCrfPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /* outputDesc */,
                                    void const* const* inputs, void* const* outputs, void* workspace,
                                    cudaStream_t stream) noexcept {
    return guarded<int32_t>(mLayerName, "enqueue", -1, [&]() -> int32_t {
        std::string const error = run(inputDesc, inputs, outputs, workspace, stream);
        if (error.empty()) return 0;
        log_error(mLayerName, error);
        return -1;
    });
}

std::string MeanFieldCrfPlugin::prepare(PluginTensorDesc const* desc) {
    mShapesKnown = false;
    Dims const* dims[kNumInputs];
    for (int32_t i = 0; i < kNumInputs; ++i) dims[i] = &desc[i].dims;
    CrfShapes s;
    std::string error = read_shapes(dims, &s);
    size_t need = 0;
    if (error.empty()) error = workspace_size(mAttributes, s, &need);
    if (!error.empty()) return error;
    // The kernels must fit the workspace the plan reserved: a kernel library other than the build's, or one
    // whose need grew, would otherwise write past TensorRT's buffer.
    if (mWorkspaceBound > 0 && need > static_cast<size_t>(mWorkspaceBound))
        return "the kernels need " + std::to_string(need) + " bytes of workspace for these shapes but the engine "
               "reserved " + std::to_string(mWorkspaceBound) + ": was libdynseg_crf.so changed since the build? "
               "Rebuild the engine";
    // A plan recording 0 bytes where these shapes need some: the workspace TensorRT reserved is unknown (were the
    // configured plugin's fields serialised? docs/tensorrt.md, not verified), so nothing bounds the kernels' need.
    if (mWarnUnbounded && need > 0) {
        mWarnUnbounded = false;  // once per execution context
        log(ILogger::Severity::kWARNING, mLayerName,
            "the plan records a workspace of 0 bytes, yet these shapes need " + std::to_string(need) +
                ": the kernels' need goes unchecked against the workspace TensorRT reserved");
    }
    for (int32_t i = 0; i < kNumInputs; ++i) mKnownDims[i] = desc[i].dims;
    mShapes = s;
    mWorkspaceNeed = need;
    mShapesKnown = true;
    return {};
}

std::string MeanFieldCrfPlugin::run(PluginTensorDesc const* inputDesc, void const* const* inputs, void* const* outputs,
                                    void* workspace, cudaStream_t stream) {
    bool same = mShapesKnown;
    for (int32_t i = 0; same && i < kNumInputs; ++i) {
        Dims const& d = inputDesc[i].dims;
        same = d.nbDims == mKnownDims[i].nbDims && std::equal(d.d, d.d + d.nbDims, mKnownDims[i].d);
    }
    std::string error;
    if (!same && !(error = prepare(inputDesc)).empty()) return error;  // onShapeChange was not called for these
    CrfShapes const& s = mShapes;
    CrfAttributes const& a = mAttributes;
    float* logits = static_cast<float*>(outputs[kLogits]);
    float* detection_scores = static_cast<float*>(outputs[kDetectionScores]);
    size_t const scores_bytes = static_cast<size_t>(s.detections) * sizeof(float);
    if (identity(a, s)) {
        size_t const logits_bytes = static_cast<size_t>(s.labels * s.height * s.width) * sizeof(float);
        error = copy_through(logits, inputs[kUnary], logits_bytes, stream);
        if (error.empty()) error = copy_through(detection_scores, inputs[kScores], scores_bytes, stream);
        return error;
    }
    size_t const workspace_bytes = mWorkspaceNeed;
    if (workspace == nullptr) return "TensorRT passed no workspace";
    Problem p;
    fill_problem(a, s, inputs, detection_scores, &p);
    // Without detections the library leaves the scores alone: they pass through.
    if (p.problem.detections == nullptr) error = copy_through(detection_scores, inputs[kScores], scores_bytes, stream);
    if (!error.empty()) return error;
    dynseg_status const status =
        dynseg_crf_forward_cuda(&p.problem, static_cast<float const*>(inputs[kUnary]), logits, workspace, workspace_bytes,
                                stream);
    return status == DYNSEG_OK ? std::string() : library_error("dynseg_crf_forward_cuda", status);
}

IPluginV3* MeanFieldCrfPlugin::attachToContext(IPluginResourceContext* /* context */) noexcept {
    return clone();  // nothing is shared between execution contexts
}

PluginFieldCollection const* MeanFieldCrfPlugin::getFieldsToSerialize() noexcept {
    return guarded<PluginFieldCollection const*>(mLayerName, "getFieldsToSerialize", nullptr, [&] {
        CrfAttributes const& a = mAttributes;
        mFields = {
            PluginField("iterations", &a.iterations, PluginFieldType::kINT32, 1),
            PluginField("theta_spatial", &a.theta_spatial, PluginFieldType::kFLOAT32, 1),
            PluginField("theta_bilateral_xy", &a.theta_bilateral_xy, PluginFieldType::kFLOAT32, 1),
            PluginField("theta_bilateral_rgb", &a.theta_bilateral_rgb, PluginFieldType::kFLOAT32, 1),
            PluginField("normalization", a.normalization.c_str(), PluginFieldType::kCHAR,
                        static_cast<int32_t>(a.normalization.size() + 1)),
            PluginField("detection_potential", &a.detection_potential, PluginFieldType::kINT32, 1),
            PluginField("score_ceiling", &a.score_ceiling, PluginFieldType::kFLOAT32, 1),
            PluginField("epsilon", &a.epsilon, PluginFieldType::kFLOAT32, 1),
        };
        // the plan-only fields (plan_only, read back by read_plan)
        if (mKernelLibrary.empty()) mKernelLibrary = kernel_library_identity();
        mFields.emplace_back("kernel_library", mKernelLibrary.c_str(), PluginFieldType::kCHAR,
                             static_cast<int32_t>(mKernelLibrary.size() + 1));
        mFields.emplace_back("workspace_bytes", &mWorkspaceBound, PluginFieldType::kINT64, 1);
        mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
        mFieldCollection.fields = mFields.data();
        return &mFieldCollection;
    });
}

// ---- the creator --------------------------------------------------------------------------------------

std::string parse_fields(PluginFieldCollection const* fc, CrfAttributes* attributes, std::vector<std::string>* ignored) {
    if (fc == nullptr || (fc->nbFields > 0 && fc->fields == nullptr)) return "no field collection";
    CrfAttributes a;
    bool seen_iterations = false, seen_spatial = false, seen_xy = false, seen_rgb = false;
    for (int32_t i = 0; i < fc->nbFields; ++i) {
        PluginField const& f = fc->fields[i];
        std::string const name = f.name != nullptr ? f.name : "";
        std::string problem;
        if (name == "iterations") problem = read_int(f, &a.iterations);
        else if (name == "theta_spatial") problem = read_float(f, &a.theta_spatial);
        else if (name == "theta_bilateral_xy") problem = read_float(f, &a.theta_bilateral_xy);
        else if (name == "theta_bilateral_rgb") problem = read_float(f, &a.theta_bilateral_rgb);
        else if (name == "normalization") problem = read_string(f, &a.normalization);
        else if (name == "detection_potential") problem = read_int(f, &a.detection_potential);
        else if (name == "score_ceiling") problem = read_float(f, &a.score_ceiling);
        else if (name == "epsilon") problem = read_float(f, &a.epsilon);
        else if (ignored != nullptr) ignored->push_back(name);
        if (!problem.empty()) return "field \"" + name + "\" " + problem;
        seen_iterations |= name == "iterations";
        seen_spatial |= name == "theta_spatial";
        seen_xy |= name == "theta_bilateral_xy";
        seen_rgb |= name == "theta_bilateral_rgb";
    }
    if (!(seen_iterations && seen_spatial && seen_xy && seen_rgb))
        return "the fields iterations, theta_spatial, theta_bilateral_xy and theta_bilateral_rgb are required";
    std::string const error = a.validate();
    if (!error.empty()) return error;
    *attributes = a;
    return {};
}

MeanFieldCrfPluginCreator::MeanFieldCrfPluginCreator() {
    mFieldNames = {
        PluginField("iterations", nullptr, PluginFieldType::kINT32, 1),
        PluginField("theta_spatial", nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("theta_bilateral_xy", nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("theta_bilateral_rgb", nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("normalization", nullptr, PluginFieldType::kCHAR, 0),
        PluginField("detection_potential", nullptr, PluginFieldType::kINT32, 1),
        PluginField("score_ceiling", nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("epsilon", nullptr, PluginFieldType::kFLOAT32, 1),
    };
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* MeanFieldCrfPluginCreator::getPluginName() const noexcept { return kPluginName; }
char const* MeanFieldCrfPluginCreator::getPluginVersion() const noexcept { return kPluginVersion; }
char const* MeanFieldCrfPluginCreator::getPluginNamespace() const noexcept { return kPluginNamespace; }
PluginFieldCollection const* MeanFieldCrfPluginCreator::getFieldNames() noexcept { return &mFieldCollection; }

IPluginV3* MeanFieldCrfPluginCreator::createPlugin(char const* name, PluginFieldCollection const* fc,
                                                   TensorRTPhase phase) noexcept {
    std::string const layer = name != nullptr ? name : "";
    return guarded<IPluginV3*>(layer, "createPlugin", nullptr, [&]() -> IPluginV3* {
        CrfAttributes attributes;
        std::vector<std::string> ignored;
        std::string const error = parse_fields(fc, &attributes, &ignored);
        if (!error.empty()) {
            log_error(layer, error);
            return nullptr;
        }
        // Only a plan's plan-only fields are read: at build time the plugin records its own workspace and
        // kernel library, never what a caller passed.
        bool const runtime = phase == TensorRTPhase::kRUNTIME;
        PlanRecord plan;
        if (runtime && !read_plan(layer, *fc, &plan)) return nullptr;
        for (std::string const& field : ignored) {
            if (field == "plugin_version" || field == "plugin_namespace" || (runtime && plan_only(field))) continue;
            log(ILogger::Severity::kWARNING, layer,
                plan_only(field) ? "ignoring the field \"" + field + "\", which only a plan carries"
                                 : "ignoring the unknown field \"" + field + "\"");
        }
        return new MeanFieldCrfPlugin(layer, std::move(attributes), std::move(plan));
    });
}

}  // namespace tensorrt
}  // namespace dynseg

// ---- the library's entry points (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins) ----------------

extern "C" {

__attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    nbCreators = 0;
    if (std::string const& mismatch = dynseg::tensorrt::version_mismatch(); !mismatch.empty()) {
        std::fprintf(stderr, "%s\n", mismatch.c_str());  // TensorRT's logger has the other layout too
        return nullptr;
    }
    // nothing may throw into TensorRT's loader (the creator's first construction allocates)
    return dynseg::tensorrt::guarded<IPluginCreatorInterface* const*>("", "getCreators", nullptr,
                                                                      [&]() -> IPluginCreatorInterface* const* {
        // the kernel library's host code is compiled for its building machine's CPU (-march=native); said
        // through TensorRT's logger where setLoggerFinder came first, else on stderr
        if (char const* missing = dynseg_cpu_missing(); missing[0] != '\0') {
            dynseg::tensorrt::log_error("", std::string("libdynseg_crf.so was compiled for a CPU with ") + missing +
                                                ", which this CPU lacks: rebuild dynseg on this machine, or for "
                                                "any x86-64 CPU with -DDYNSEG_NATIVE_ARCH=OFF");
            return nullptr;
        }
        static dynseg::tensorrt::MeanFieldCrfPluginCreator creator;
        static IPluginCreatorInterface* const creators[] = {&creator};
        nbCreators = 1;
        return creators;
    });
}

__attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder* finder) {
    // the finder's layout is the headers' only in their major version
    dynseg::tensorrt::guarded<int32_t>("", "setLoggerFinder", 0, [&] {
        if (dynseg::tensorrt::version_mismatch().empty()) dynseg::tensorrt::gLoggerFinder.set(finder);
        return 0;
    });
}

// The TensorRT major version whose headers this library was compiled against: a library built for one
// major version must not be loaded into another, and TensorRT does not check. getCreators refuses a
// mismatch it can see; dynseg's Python side compares this before loading, so it can say so in an exception.
__attribute__((visibility("default"))) int32_t dynseg_tensorrt_headers_major() {
    return NV_TENSORRT_MAJOR;
}

}  // extern "C"
