// tensorrt_harness.cpp: plays TensorRT's part for dynseg's MeanFieldCRF plugin, so that the plugin runs
// on machines without TensorRT (test_emulated_plugin.py). Compiled with the plugin, against TensorRT's
// public headers, into the library whose CUDA kernels emulator.py emulates on the CPU; a C ABI for ctypes.
//
// It calls the plugin's interfaces in the order TensorRT's builder and runtime do: the library's entry
// points (setLoggerFinder, getCreators), createPlugin from the node's fields, then the build phase (output
// count, types and shapes, format negotiation, configurePlugin with the profile, getWorkspaceSize), the
// plan (getFieldsToSerialize, copied as a plan holds them, then createPlugin in the runtime phase), and the
// runtime phase (attachToContext, onShapeChange, enqueue with a workspace of the size the build asked).
// What the plugin logs is kept for the tests to read. Device memory is host memory here.
#include "mean_field_crf_plugin.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

using namespace nvinfer1;

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
extern "C" void setLoggerFinder(ILoggerFinder* finder);

namespace {

class Logger final : public ILogger {
public:
    void log(Severity severity, AsciiChar const* message) noexcept override {
        mText += severity <= Severity::kERROR ? "error: " : severity == Severity::kWARNING ? "warning: " : "info: ";
        mText += message;
        mText += "\n";
    }
    std::string take() { return std::exchange(mText, {}); }

private:
    std::string mText;
};

class Finder final : public ILoggerFinder {
public:
    ILogger* findLogger() override { return &mLogger; }
    Logger mLogger;
};

Finder gFinder;
std::string gTaken;

IPluginCreatorV3One* creator() {
    setLoggerFinder(&gFinder);
    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators(count);
    for (int32_t i = 0; i < count; ++i) {
        if (std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0)
            return static_cast<IPluginCreatorV3One*>(creators[i]);
    }
    return nullptr;
}

Dims dims_of(int32_t rank, int64_t const* extents) {
    Dims d{};
    d.nbDims = rank;
    for (int32_t i = 0; i < rank; ++i) d.d[i] = extents[i];
    return d;
}

DataType data_type(char const* name) {
    std::string const n = name;
    if (n == "float32") return DataType::kFLOAT;
    if (n == "float16") return DataType::kHALF;
    if (n == "int32") return DataType::kINT32;
    if (n == "int64") return DataType::kINT64;
    if (n == "int8") return DataType::kINT8;
    return DataType::kBOOL;
}

// The plugin builds no shape expression of its own (its outputs take its inputs' expressions), so no
// builder stands behind this one.
struct NoExpressions final : IExprBuilder {
    NoExpressions() { mImpl = nullptr; }
};

// The ten inputs' and two outputs' descriptions: shapes as (rank, extents[8]) per tensor.
struct Tensors {
    std::vector<PluginTensorDesc> desc;
    Tensors(int32_t count, int32_t const* ranks, int64_t const* extents, char const* const* types) : desc(count) {
        for (int32_t i = 0; i < count; ++i) {
            desc[i].dims = dims_of(ranks[i], extents + 8 * i);
            desc[i].type = data_type(types[i]);
            desc[i].format = TensorFormat::kLINEAR;
            desc[i].scale = -1.0f;
        }
    }
};

}  // namespace

extern "C" {

// Everything logged since the last call, one "severity: message" line each.
char const* harness_take_log() {
    gTaken = gFinder.mLogger.take();
    return gTaken.c_str();
}

char const* harness_creator_identity() {
    static std::string identity;
    IPluginCreatorV3One* c = creator();
    identity = c == nullptr ? "" : std::string(c->getPluginNamespace()) + "::" + c->getPluginName() + " " +
                                       c->getPluginVersion();
    return identity.c_str();
}

// createPlugin from fields given as parallel arrays; kinds are "int32", "int64", "float32", "float64", "char".
// phase: 0 build, 1 runtime. NULL when the plugin refuses (it logs why).
IPluginV3* harness_create(char const* name, int32_t phase, int32_t count, char const* const* names,
                          char const* const* kinds, void const* const* data, int32_t const* lengths) {
    std::vector<PluginField> fields;
    for (int32_t i = 0; i < count; ++i) {
        std::string const k = kinds[i];
        PluginFieldType const type = k == "int32"   ? PluginFieldType::kINT32
                                     : k == "int64" ? PluginFieldType::kINT64
                                     : k == "float32" ? PluginFieldType::kFLOAT32
                                     : k == "float64" ? PluginFieldType::kFLOAT64
                                     : k == "char"    ? PluginFieldType::kCHAR
                                                      : PluginFieldType::kUNKNOWN;
        fields.emplace_back(names[i], data[i], type, lengths[i]);
    }
    PluginFieldCollection collection{count, fields.data()};
    return creator()->createPlugin(name, &collection, phase == 0 ? TensorRTPhase::kBUILD : TensorRTPhase::kRUNTIME);
}

void harness_destroy(IPluginV3* plugin) { delete plugin; }

// The build phase for a profile: every input's min/opt/max shapes and types. Fills the output count and
// types, which input's shape expressions each output took (-1: none of them), whether the plugin accepts
// each tensor's type as given (accepted[12]), and the workspace size. Returns configurePlugin's result
// (or -1 when an earlier step failed).
int32_t harness_build(IPluginV3* plugin, int32_t const* ranks, int64_t const* min, int64_t const* opt,
                      int64_t const* max, char const* const* types, int32_t* nb_outputs, int32_t* output_types,
                      int32_t* output_source, int32_t* accepted, uint64_t* workspace) {
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    *nb_outputs = build->getNbOutputs();
    if (*nb_outputs != dynseg::tensorrt::kNumOutputs) return -1;
    int32_t const n = dynseg::tensorrt::kNumInputs;
    std::vector<DataType> input_types(n), out_types(2);
    for (int32_t i = 0; i < n; ++i) input_types[i] = data_type(types[i]);
    if (build->getOutputDataTypes(out_types.data(), 2, input_types.data(), n) != 0) return -1;
    for (int32_t o = 0; o < 2; ++o) output_types[o] = static_cast<int32_t>(out_types[o]);

    // Shape expressions stand for themselves: the plugin may only pass the inputs' on.
    static char tokens[dynseg::tensorrt::kNumInputs][Dims::MAX_DIMS];
    std::vector<DimsExprs> exprs(n), out_exprs(2);
    for (int32_t i = 0; i < n; ++i) {
        exprs[i].nbDims = ranks[i];
        for (int32_t j = 0; j < ranks[i]; ++j) exprs[i].d[j] = reinterpret_cast<IDimensionExpr const*>(&tokens[i][j]);
    }
    NoExpressions builder;
    if (build->getOutputShapes(exprs.data(), n, nullptr, 0, out_exprs.data(), 2, builder) != 0) return -1;
    for (int32_t o = 0; o < 2; ++o) {
        output_source[o] = -1;
        for (int32_t i = 0; i < n; ++i) {
            if (out_exprs[o].nbDims == exprs[i].nbDims &&
                std::equal(exprs[i].d, exprs[i].d + exprs[i].nbDims, out_exprs[o].d))
                output_source[o] = i;
        }
    }

    std::vector<DynamicPluginTensorDesc> dyn(n + 2);
    for (int32_t i = 0; i < n + 2; ++i) {
        int32_t const source = i < n ? i : output_source[i - n];
        int32_t const rank = source >= 0 ? ranks[source] : 0;
        int64_t const offset = 8 * (source >= 0 ? source : 0);
        dyn[i].desc.dims = dims_of(rank, max + offset);
        dyn[i].desc.type = i < n ? input_types[i] : out_types[i - n];
        dyn[i].desc.format = TensorFormat::kLINEAR;
        dyn[i].desc.scale = -1.0f;
        dyn[i].min = dims_of(rank, min + offset);
        dyn[i].opt = dims_of(rank, opt + offset);
        dyn[i].max = dims_of(rank, max + offset);
    }
    bool all = true;
    for (int32_t pos = 0; pos < n + 2; ++pos) {
        accepted[pos] = build->supportsFormatCombination(pos, dyn.data(), n, 2) ? 1 : 0;
        all = all && accepted[pos];
    }
    if (!all) return -1;
    int32_t const configured = build->configurePlugin(dyn.data(), n, dyn.data() + n, 2);
    if (configured != 0) return configured;
    *workspace = build->getWorkspaceSize(dyn.data(), n, dyn.data() + n, 2);
    return 0;
}

// The plan: the fields getFieldsToSerialize gives, copied (a plan outlives the plugin), and the runtime
// phase's createPlugin from them. NULL when that fails.
IPluginV3* harness_through_plan(IPluginV3* plugin, char const* name) {
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* fc = runtime->getFieldsToSerialize();
    if (fc == nullptr) return nullptr;
    std::vector<std::string> names;
    std::vector<std::vector<char>> bytes;
    for (int32_t i = 0; i < fc->nbFields; ++i) {
        PluginField const& f = fc->fields[i];
        size_t const size = f.type == PluginFieldType::kCHAR    ? 1
                            : f.type == PluginFieldType::kINT64 || f.type == PluginFieldType::kFLOAT64 ? 8
                                                                                                       : 4;
        names.emplace_back(f.name);
        char const* data = static_cast<char const*>(f.data);
        bytes.emplace_back(data, data + size * static_cast<size_t>(f.length));
    }
    std::vector<PluginField> fields;
    for (int32_t i = 0; i < fc->nbFields; ++i)
        fields.emplace_back(names[i].c_str(), bytes[i].data(), fc->fields[i].type, fc->fields[i].length);
    PluginFieldCollection collection{fc->nbFields, fields.data()};
    return creator()->createPlugin(name, &collection, TensorRTPhase::kRUNTIME);
}

// The fields a plugin serialises, as "name kind length" lines (the tests compare them with what went in).
char const* harness_serialised_fields(IPluginV3* plugin) {
    static std::string text;
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* fc = runtime->getFieldsToSerialize();
    text.clear();
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
        PluginField const& f = fc->fields[i];
        text += std::string(f.name) + " " + std::to_string(static_cast<int32_t>(f.type)) + " ";
        if (f.type == PluginFieldType::kCHAR) text += std::string(static_cast<char const*>(f.data));
        else if (f.type == PluginFieldType::kINT32) text += std::to_string(*static_cast<int32_t const*>(f.data));
        else if (f.type == PluginFieldType::kINT64) text += std::to_string(*static_cast<int64_t const*>(f.data));
        else if (f.type == PluginFieldType::kFLOAT32) text += std::to_string(*static_cast<float const*>(f.data));
        text += "\n";
    }
    return text.c_str();
}

// The runtime phase on the execution context's copy of the plugin: the inputs' shapes, onShapeChange,
// then enqueue on the null stream. Returns the first failing call's result.
int32_t harness_enqueue(IPluginV3* plugin, int32_t const* ranks, int64_t const* extents, char const* const* types,
                        void const* const* inputs, void* const* outputs, void* workspace) {
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    IPluginV3* context_copy = runtime->attachToContext(nullptr);
    if (context_copy == nullptr) return -1;
    auto* run = static_cast<IPluginV3OneRuntime*>(context_copy->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    int32_t const n = dynseg::tensorrt::kNumInputs;
    Tensors in(n, ranks, extents, types);
    std::vector<PluginTensorDesc> out(2, in.desc[dynseg::tensorrt::kUnary]);
    out[dynseg::tensorrt::kDetectionScores] = in.desc[dynseg::tensorrt::kScores];
    int32_t result = run->onShapeChange(in.desc.data(), n, out.data(), 2);
    if (result == 0) result = run->enqueue(in.desc.data(), out.data(), inputs, outputs, workspace, nullptr);
    delete context_copy;
    return result;
}

}  // extern "C"
