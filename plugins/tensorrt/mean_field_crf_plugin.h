/*
 * mean_field_crf_plugin.h: the TensorRT plugin for dynseg::MeanFieldCRF version 1 (docs/ops.md), an IPluginV3
 * with the IPluginV3One core, build and runtime capabilities, and its IPluginCreatorV3One. Name
 * "MeanFieldCRF", namespace "dynseg", version "1"; the computation is one call of the CUDA kernel
 * library per node (plugins/include/dynseg_crf.h, docs/crf.md §6), the detection potential included.
 * Inputs, outputs and attributes: plugins/tensorrt/README.md.
 *
 * The shared library exports getCreators and setLoggerFinder (extern "C"), and
 * dynseg_tensorrt_headers_major (the TensorRT major version it was compiled for), and nothing else
 * (exports.map), so TensorRT's plugin registry loads it with loadLibrary (Python:
 * trt.get_plugin_registry().load_library) and trtexec with --dynamicPlugins. In a TensorRT of another
 * major version getCreators offers no creator and says why on stderr.
 */
#ifndef DYNSEG_TENSORRT_MEAN_FIELD_CRF_PLUGIN_H
#define DYNSEG_TENSORRT_MEAN_FIELD_CRF_PLUGIN_H

#include <NvInferRuntime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace dynseg {
namespace tensorrt {

constexpr char const* kPluginName = "MeanFieldCRF";
constexpr char const* kPluginNamespace = "dynseg";
constexpr char const* kPluginVersion = "1";
constexpr int32_t kNumInputs = 10;
constexpr int32_t kNumOutputs = 2;

// Input and output positions (docs/ops.md).
enum Input : int32_t {
    kUnary = 0,
    kImage = 1,
    kSpatialWeight = 2,
    kBilateralWeight = 3,
    kCompatibility = 4,
    kBoxes = 5,
    kLabels = 6,
    kScores = 7,
    kDetectionX = 8,
    kDetectionY = 9,
};
enum Output : int32_t { kLogits = 0, kDetectionScores = 1 };

// The node's attributes, validated once (validate()) when a plugin is created.
struct CrfAttributes {
    int32_t iterations = 5;
    float theta_spatial = 3.0f;
    float theta_bilateral_xy = 80.0f;
    float theta_bilateral_rgb = 13.0f;
    std::string normalization = "after";  // "after" or "symmetric"
    int32_t detection_potential = 0;      // 0 or 1
    float score_ceiling = 1.0f;
    float epsilon = 0.0f;

    // An empty string when every field is in range, else a message naming the field and its value.
    std::string validate() const;
};

// The problem's sizes, read from the ten input shapes (at run time or the profile's maximum).
struct CrfShapes {
    int64_t labels = 0;      // L
    int64_t height = 0;      // H
    int64_t width = 0;       // W
    int64_t channels = 0;    // C, the image's colour planes
    int64_t detections = 0;  // D
    int32_t spatial_kind = 0;    // dynseg_weight_kind
    int32_t bilateral_kind = 0;  // dynseg_weight_kind
    int32_t compat_kind = 0;     // dynseg_compat_kind (Potts or full)
};

// An empty string when the ten shapes form a valid problem, else what is wrong. With `bounds` the dims
// are a profile's upper bounds, which TensorRT works out for each tensor on its own: the unary's H, W
// (computed in the graph) may then be looser than the image's, and the problem takes the tighter (at run
// time both tensors have the same H, W, which neither bound exceeds).
std::string read_shapes(nvinfer1::Dims const* const dims[kNumInputs], CrfShapes* shapes, bool bounds = false);

// The kernel library's workspace for these shapes (dynseg_crf_workspace_size_cuda: its worst case, with its
// own alignment slack). It grows with L, H, W, C and D, so the size for the profile's maximum dims
// (getWorkspaceSize) covers every shape the profile admits. An empty string, else the library's message.
std::string workspace_size(CrfAttributes const& attributes, CrfShapes const& shapes, size_t* bytes);

// What a plan records beside the node's attributes ("workspace_bytes", "kernel_library"): written by
// getFieldsToSerialize, read back by createPlugin in the runtime phase only.
struct PlanRecord {
    int64_t workspace_bytes = 0;     // the workspace TensorRT reserved for the layer; 0 where unknown
    bool workspace_recorded = false;  // whether the plan carried workspace_bytes (a plan of an older plugin does not)
    std::string kernel_library;       // dynseg_version and ABI of the kernel library; empty where unknown
};

class MeanFieldCrfPlugin final : public nvinfer1::IPluginV3,
                                 public nvinfer1::IPluginV3OneCore,
                                 public nvinfer1::IPluginV3OneBuild,
                                 public nvinfer1::IPluginV3OneRuntime {
public:
    MeanFieldCrfPlugin(std::string layer_name, CrfAttributes attributes, PlanRecord plan = {});
    MeanFieldCrfPlugin(MeanFieldCrfPlugin const& other);
    MeanFieldCrfPlugin& operator=(MeanFieldCrfPlugin const&) = delete;
    ~MeanFieldCrfPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                               nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                            int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                          int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                    void const* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;


private:
    // The work of enqueue; an empty string on success, else the failure.
    std::string run(nvinfer1::PluginTensorDesc const* inputDesc, void const* const* inputs, void* const* outputs,
                    void* workspace, cudaStream_t stream);
    // Reads the shapes and the kernels' workspace need for `desc` into the cache (onShapeChange's work).
    std::string prepare(nvinfer1::PluginTensorDesc const* desc);

    std::string mLayerName;
    CrfAttributes mAttributes;
    // The workspace TensorRT reserved for this layer: getWorkspaceSize's answer for the profile's maximum
    // shapes, kept from configurePlugin / getWorkspaceSize and carried through the plan ("workspace_bytes").
    // 0 where unknown (a plan of an older plugin): enqueue then cannot bound the kernels' need.
    mutable int64_t mWorkspaceBound = 0;
    // The kernel library the plan was built with ("kernel_library": dynseg_version and ABI); empty where unknown.
    std::string mKernelLibrary;
    // The plan recorded a workspace of 0 bytes: prepare warns the first time shapes need some, since 0 is then
    // not what TensorRT reserved (docs/tensorrt.md: which plugin copy TensorRT serialises is not verified).
    bool mWarnUnbounded = false;
    // What onShapeChange worked out for the current shapes, so that enqueue does no host-side sizing.
    bool mShapesKnown = false;
    nvinfer1::Dims mKnownDims[kNumInputs]{};
    CrfShapes mShapes;
    size_t mWorkspaceNeed = 0;
    // Storage behind getFieldsToSerialize (rebuilt on each call, so copies never share pointers).
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class MeanFieldCrfPluginCreator final : public nvinfer1::IPluginCreatorV3One {
public:
    MeanFieldCrfPluginCreator();
    ~MeanFieldCrfPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                      nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

// Reads a field collection (the ONNX node's attributes at build time, getFieldsToSerialize's at run time)
// into attributes; an empty string on success, else which field is wrong. Unknown fields are reported in
// *ignored (plugin_version / plugin_namespace from the ONNX node are expected there).
std::string parse_fields(nvinfer1::PluginFieldCollection const* fc, CrfAttributes* attributes,
                         std::vector<std::string>* ignored);

}  // namespace tensorrt
}  // namespace dynseg

#endif  // DYNSEG_TENSORRT_MEAN_FIELD_CRF_PLUGIN_H
