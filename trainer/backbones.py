"""The semantic network's backbones and heads: image → semantic logits at stride 8 (docs/algorithm.md §1).

This module owns:
- `ResNet` (resnet18/50/101) with layer3 and layer4 dilated instead of strided (output stride 8), and
  `VGG16` with fc6/fc7 as convolutions (FCN-8s), both named exactly like torchvision's ImageNet
  models so that a torchvision `.pth` file loads as it is (`load_torchvision_weights`);
- the heads that turn backbone features into K+1 logits: `PyramidPoolingHead` (PSPNet) for the
  ResNets and `FCN8sHead` (skips from pool3 and pool4) for VGG16;
- `SemanticNetwork` (backbone → head) and its presets, `semantic_network(...)`.

Output size: for an (H, W) input every network returns logits of (ceil(H/8), ceil(W/8)). Every stride-2
layer here maps n → ceil(n/2) (padded convolutions, ceil-mode pooling), and three of them compose to
ceil(n/8). Nothing is cropped, and no input size is special.

The networks do not normalise: they take standardised RGB, (x / 255 - mean) / std with the model's mean
and std (by default `IMAGENET_MEAN` and `IMAGENET_STD`, the statistics torchvision's ImageNet weights were
trained with), which `DynamicallyInstantiatedNetwork.semantic_unary` computes inside the exported graph.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynseg.sdk.errors import InvalidArgumentError
from dynseg.sdk.checks import int_in, one_of
from dynseg.sdk.files import check_regular_file

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "BasicBlock", "Bottleneck", "ResNet", "VGG16", "PyramidPoolingHead",
    "FCN8sHead", "SemanticNetwork", "semantic_network", "load_torchvision_weights", "BackboneName",
    "TorchvisionBackbone", "adaptive_average_pool",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet, RGB order, for images in 0..1: normalised = (image - mean) / std."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet, RGB order, for images in 0..1."""

BackboneName = Literal["resnet18", "resnet50", "resnet101", "vgg16_fcn8s"]
PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------------------------------
# Loading torchvision weights
# ---------------------------------------------------------------------------------------------------


class TorchvisionBackbone(nn.Module):
    """Base of the backbones that load torchvision ImageNet state_dicts.

    A subclass says which torchvision keys it expects (`torchvision_layout`), which ones it drops on
    purpose (`_ignored_prefixes`: the ImageNet classifier) and how a torchvision tensor becomes one of
    its own (`_convert`, identity unless a layer changed form, like VGG's fc6).
    """

    _torchvision_name: str = "?"
    _ignored_prefixes: tuple[str, ...] = ()

    def torchvision_layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """torchvision key → (own key, shape the tensor has in a torchvision file). Same names by default."""
        return {key: (key, tuple(value.shape)) for key, value in self.state_dict(keep_vars=True).items()}

    def _convert(self, tensor: Tensor, own_shape: torch.Size) -> Tensor:
        return tensor

    def load_torchvision_state_dict(self, state_dict: Mapping[str, Tensor], *, source: str = "state_dict") -> None:
        """Copy a torchvision ImageNet state_dict into this backbone, strictly.

        Keys under `_ignored_prefixes` (the 1000-class classifier) are dropped. A missing
        ``*.num_batches_tracked`` is tolerated (torchvision's older files lack it) and left as it is.
        Anything else missing, unexpected or of the wrong shape raises, and nothing is copied.

        Args:
            state_dict: torchvision key → tensor, any device and floating dtype.
            source: what to call the state_dict in error messages (the file name).

        Raises:
            InvalidArgumentError (a ValueError): naming `source` and every offending key.
        """
        if not isinstance(state_dict, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state_dict.items()
        ):
            raise InvalidArgumentError(f"{source}: expected a flat mapping of parameter names to tensors "
                                       "(a state_dict)")
        layout = self.torchvision_layout()
        given = {k: v for k, v in state_dict.items() if not k.startswith(self._ignored_prefixes)}
        missing = [k for k in layout if k not in given and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in given if k not in layout]
        wrong_shape = [
            f"{k} {tuple(v.shape)} (expected {layout[k][1]})"
            for k, v in given.items()
            if k in layout and tuple(v.shape) != layout[k][1]
        ]
        if missing or unexpected or wrong_shape:  # every key would be hundreds of lines: counts and the first
            kinds = (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong_shape))
            problems = [f"{len(keys)} {label} (first: {keys[0]})" for label, keys in kinds if keys]
            raise InvalidArgumentError(
                f"{source} is not a torchvision {self._torchvision_name} state_dict (the weights of another "
                f"backbone?): keys {', '.join(problems)}"
            )
        # a NaN weight would otherwise surface steps later, as a non-finite unary in the CRF
        for key, tensor in given.items():
            if key.endswith("num_batches_tracked"):
                continue
            if not tensor.is_floating_point():
                raise InvalidArgumentError(f"{source}: {key} holds {tensor.dtype} values, not floating-point weights")
            if not bool(torch.isfinite(tensor).all()):
                raise InvalidArgumentError(f"{source}: {key} holds a non-finite value (NaN or infinity): a broken or "
                                           "diverged weights file")
        own_state = self.state_dict()
        converted = dict(own_state)  # keeps our num_batches_tracked where the file has none
        for key, tensor in given.items():
            own_key = layout[key][0]
            converted[own_key] = self._convert(tensor, own_state[own_key].shape)
        self.load_state_dict(converted, strict=True)


def load_torchvision_weights(backbone: TorchvisionBackbone, path: PathLike) -> None:
    """Load a torchvision ImageNet `.pth` file (a plain state_dict) into `backbone`.

    The file is read with ``torch.load(weights_only=True)`` onto the CPU, so no code in it runs.

    Raises:
        FileNotFoundError: no such file.
        InvalidArgumentError (a ValueError): a folder, pipe or device (which would be read forever), or
            a file that is not a state_dict of this architecture; the message names the file and the
            offending keys.
    """
    path = os.fspath(path)
    if os.path.exists(path):  # a missing one raises FileNotFoundError below, as documented
        check_regular_file(Path(path), "pretrained weights file")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, MemoryError):  # a path missing, or the machine's memory: not the file's content
        raise
    except Exception as error:  # pickle and zip errors have many types; the caller needs the file name
        # torch's own text runs to pages, and its advice (weights_only=False) is unsafe for a stranger's file
        first = (str(error).strip().splitlines() or [""])[0].split(". ")[0][:160]
        if first:
            why = f"{type(error).__name__}: {first}"
        else:  # an empty file's EOFError has no text
            why = "it is empty" if os.path.getsize(path) == 0 else type(error).__name__
        raise InvalidArgumentError(f"{path}: cannot be read as a torch state_dict, such as torchvision's ImageNet "
                                   f"weights (resnet18-f37072fd.pth): {why}") from error
    backbone.load_torchvision_state_dict(state_dict, source=path)


def _init_conv(conv: nn.Conv2d) -> None:
    # torchvision's init for convolutions followed by ReLU.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _init_modules(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            _init_conv(m)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------------
# ResNet
# ---------------------------------------------------------------------------------------------------


def _conv3x3(in_channels: int, out_channels: int, *, stride: int, dilation: int) -> nn.Conv2d:
    # padding = dilation keeps n → ceil(n/stride) for a 3×3 kernel at any dilation.
    return nn.Conv2d(
        in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


class BasicBlock(nn.Module):
    """ResNet-18/34 residual block: two 3×3 convolutions. (B, in_channels, H, W) → (B, channels, H', W').

    Unlike torchvision's, it accepts dilation > 1 (both convolutions dilate), so resnet18 can run at
    output stride 8 too; the parameters are the same either way.
    """

    expansion = 1

    def __init__(
        self,
        *,
        in_channels: int,
        channels: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, channels, stride=stride, dilation=dilation)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(channels, channels, stride=1, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50/101 residual block: 1×1 reduce, 3×3, 1×1 expand (×4). (B, in_channels, H, W) →
    (B, 4·channels, H', W'). The stride and dilation sit on the 3×3 convolution (torchvision's
    "ResNet v1.5"), which is where its ImageNet weights expect them."""

    expansion = 4

    def __init__(
        self,
        *,
        in_channels: int,
        channels: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, channels, stride=stride, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(TorchvisionBackbone):
    """ResNet without its classifier: (B, 3, H, W) normalised image → (B, out_channels, H/s, W/s).

    Module names are torchvision's (`conv1`, `bn1`, `relu`, `maxpool`, `layer1`..`layer4`, blocks
    `layerX.N.*` with `downsample.0/1`), so its ImageNet state_dicts load with only `fc.*` dropped.

    Args:
        block: `BasicBlock` (resnet18) or `Bottleneck` (resnet50/101).
        layers: number of blocks in layer1..layer4, e.g. (2, 2, 2, 2) for resnet18.
        dilate: for layer2..layer4, replace the layer's stride 2 by dilation (torchvision's
            ``replace_stride_with_dilation``). The default (False, True, True) gives output stride 8,
            s = 8, with spatial size ceil(H/8) × ceil(W/8). As in torchvision, the first block of a
            dilated layer still uses the previous layer's dilation (layer3: 1, 2, 2, ...; layer4: 2, 4, 4).
    """

    _torchvision_name = "ResNet"
    _ignored_prefixes = ("fc.",)

    def __init__(
        self,
        *,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        dilate: tuple[bool, bool, bool] = (False, True, True),
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(dilate) != 3:
            raise InvalidArgumentError(f"layers needs 4 entries and dilate 3, got {tuple(layers)} and {tuple(dilate)}")
        self._torchvision_name = f"ResNet ({block.__name__}, layers {tuple(layers)})"
        self._block = block
        self._in_channels = 64
        self._dilation = 1
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], stride=1, dilate=False)
        self.layer2 = self._make_layer(128, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(256, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(512, layers[3], stride=2, dilate=dilate[2])
        self.out_channels = 512 * block.expansion
        self.output_stride = 4 * 2 ** sum(not d for d in dilate)
        _init_modules(self)

    def _make_layer(self, channels: int, blocks: int, *, stride: int, dilate: bool) -> nn.Sequential:
        block = self._block
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        out_channels = channels * block.expansion
        downsample = None
        if stride != 1 or self._in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        modules = [
            block(
                in_channels=self._in_channels, channels=channels, stride=stride, dilation=previous_dilation,
                downsample=downsample,
            )
        ]
        self._in_channels = out_channels
        modules += [
            block(in_channels=out_channels, channels=channels, dilation=self._dilation) for _ in range(1, blocks)
        ]
        return nn.Sequential(*modules)

    def forward(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) → (B, out_channels, ceil(H/s), ceil(W/s)), s = output_stride (8 by default)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(image))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# ---------------------------------------------------------------------------------------------------
# VGG16 (FCN form)
# ---------------------------------------------------------------------------------------------------

# torchvision's vgg16 configuration: channels of each 3×3 convolution, "M" for a 2×2 max-pool.
_VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)
_POOL3, _POOL4 = 16, 23  # indices in `features` of the pools whose outputs FCN-8s taps


class VGG16(TorchvisionBackbone):
    """VGG16 made fully convolutional (FCN): features → fc6 (7×7 conv) → fc7 (1×1 conv).

    (B, 3, H, W) → (pool3 (B, 256, H/8, W/8), pool4 (B, 512, H/16, W/16), fc7 (B, 4096, H/32, W/32)),
    every size rounded up (ceil).

    `features.0` … `features.30` are torchvision's vgg16 `features` (conv3×3 with padding 1, ReLU,
    2×2 max-pools). The pools use ceil mode so that each halves n to ceil(n/2), and fc6 pads by 3 so it
    keeps the size: this replaces the original FCN's 100-pixel input padding and crops, with the same
    weights, and makes the output ceil(H/8) × ceil(W/8) for every input. Loading a torchvision file
    reshapes `classifier.0` (4096, 25088) into fc6 (4096, 512, 7, 7) and `classifier.3` into fc7
    (4096, 4096, 1, 1), the convolutions equal to those Linear layers on a 7×7 pool5, and drops the
    ImageNet classifier `classifier.6`.
    """

    _torchvision_name = "VGG16"
    _ignored_prefixes = ("classifier.6.",)
    _from_classifier = {"classifier.0": "fc6", "classifier.3": "fc7"}

    def __init__(self, *, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in _VGG16_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(in_channels, int(item), 3, padding=1), nn.ReLU(inplace=True)]
                in_channels = int(item)
        self.features = nn.Sequential(*layers)
        self.fc6 = nn.Conv2d(512, 4096, 7, padding=3)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout2d(dropout)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout2d(dropout)
        self.out_channels = (256, 512, 4096)
        _init_modules(self)

    def torchvision_layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        layout = super().torchvision_layout()
        for tv_name, own_name in self._from_classifier.items():
            weight = layout.pop(f"{own_name}.weight")[1]
            layout[f"{tv_name}.weight"] = (f"{own_name}.weight", (weight[0], weight[1] * weight[2] * weight[3]))
            layout[f"{tv_name}.bias"] = layout.pop(f"{own_name}.bias")
        return layout

    def _convert(self, tensor: Tensor, own_shape: torch.Size) -> Tensor:
        # torchvision flattens pool5 channel-major (C, 7, 7), the order of a conv weight's last 3 dims.
        return tensor.reshape(own_shape)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, 3, H, W) → (pool3, pool4, fc7), strides 8, 16 and 32 (sizes rounded up)."""
        pool3 = self.features[: _POOL3 + 1](image)
        pool4 = self.features[_POOL3 + 1 : _POOL4 + 1](pool3)
        pool5 = self.features[_POOL4 + 1 :](pool4)
        fc6 = self.drop6(self.relu6(self.fc6(pool5)))
        fc7 = self.drop7(self.relu7(self.fc7(fc6)))
        return pool3, pool4, fc7


# ---------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------


def _average_pool_matrix(size: int, bins: int, like: Tensor) -> Tensor:
    """(bins, size) matrix whose row i averages positions floor(i·size/bins) .. ceil((i+1)·size/bins)-1:
    exactly the bins of `adaptive_avg_pool`, but built from tensor arithmetic on `size`, so that it
    exports with a dynamic input size (ONNX has no adaptive pooling for sizes that bins do not divide)."""
    positions = torch.arange(size, device=like.device)
    index = torch.arange(bins, device=like.device)
    start = torch.div(index * size, bins, rounding_mode="floor")
    end = torch.div((index + 1) * size + bins - 1, bins, rounding_mode="floor")
    inside = (positions[None, :] >= start[:, None]) & (positions[None, :] < end[:, None])  # (bins, size)
    weights = inside.to(like.dtype)
    return weights / weights.sum(dim=1, keepdim=True)


def adaptive_average_pool(x: Tensor, bins: int) -> Tensor:
    """(B, C, H, W) → (B, C, bins, bins), equal to ``F.adaptive_avg_pool2d(x, bins)`` for any H, W ≥ 1."""
    rows = _average_pool_matrix(x.shape[-2], bins, x)  # (bins, H)
    cols = _average_pool_matrix(x.shape[-1], bins, x)  # (bins, W)
    return rows @ x @ cols.transpose(0, 1)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class PyramidPoolingHead(nn.Module):
    """PSPNet's pyramid pooling module and classifier: (B, C, h, w) features → (B, num_classes, h, w) logits.

    Each branch average-pools the features to p×p bins (p in `pool_sizes`), reduces them to C/4
    channels (1×1 conv, BN, ReLU) and upsamples back (bilinear, corners aligned); the branches are
    concatenated with the input, fused (3×3 conv to `hidden_channels`, BN, ReLU), dropped out and
    classified (1×1 conv with bias).

    Args:
        in_channels: C, the backbone's channels.
        num_classes: K+1, background included.
        hidden_channels: width of the fusing 3×3 convolution (PSPNet: 512).
        pool_sizes: bins per side of each branch.
        dropout: drop probability before the classifier.

    Caveat: in training mode the 1×1 branch normalises B values per channel, so BatchNorm needs a batch
    of 2 or more; train with batch 1 only with the BatchNorm layers in eval mode (frozen statistics).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        hidden_channels: int = 512,
        pool_sizes: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        branch_channels = in_channels // 4
        self.pool_sizes = tuple(pool_sizes)
        self.branches = nn.ModuleList(_conv_bn_relu(in_channels, branch_channels, 1) for _ in self.pool_sizes)
        self.bottleneck = _conv_bn_relu(in_channels + branch_channels * len(self.pool_sizes), hidden_channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(hidden_channels, num_classes, 1)
        _init_modules(self)
        # Small classifier weights start the network near a uniform softmax instead of large random logits.
        nn.init.normal_(self.classifier.weight, std=0.01)

    def forward(self, features: Tensor) -> Tensor:
        """(B, C, h, w) → (B, num_classes, h, w)."""
        size = features.shape[-2:]
        pyramid = [features]
        for bins, branch in zip(self.pool_sizes, self.branches):
            pooled = branch(adaptive_average_pool(features, bins))  # (B, C/4, bins, bins)
            pyramid.append(F.interpolate(pooled, size=size, mode="bilinear", align_corners=True))
        fused = self.bottleneck(torch.cat(pyramid, dim=1))  # (B, hidden_channels, h, w)
        return self.classifier(self.dropout(fused))


def _upsample2_to(x: Tensor, like: Tensor) -> Tensor:
    """Upsample ×2 (bilinear, pixel centres on the stride-2 grid, like FCN's bilinear deconvolution),
    then crop to `like`'s size: with ceil sizes, 2·ceil(n/2) is n or n + 1."""
    up = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    return up[..., : like.shape[-2], : like.shape[-1]]


class FCN8sHead(nn.Module):
    """FCN-8s scoring: (pool3, pool4, fc7) from `VGG16` → (B, num_classes, H/8, W/8) logits.

    score_fr(fc7) is upsampled ×2 and added to score_pool4(pool4), that sum upsampled ×2 and added to
    score_pool3(pool3). The upsampling is fixed bilinear (FCN-8s "at once" also kept its deconvolutions
    at bilinear). The three scoring layers start at zero, as in FCN: the skips then start silent and
    the first gradient step gives the classifier weights (the backbone's gradient is zero until then).
    """

    def __init__(self, *, num_classes: int, in_channels: tuple[int, int, int] = (256, 512, 4096)) -> None:
        super().__init__()
        self.score_pool3 = nn.Conv2d(in_channels[0], num_classes, 1)
        self.score_pool4 = nn.Conv2d(in_channels[1], num_classes, 1)
        self.score_fr = nn.Conv2d(in_channels[2], num_classes, 1)
        for conv in (self.score_pool3, self.score_pool4, self.score_fr):
            for parameter in conv.parameters():  # weight and bias
                nn.init.zeros_(parameter)

    def forward(self, features: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """(pool3, pool4, fc7) → (B, num_classes, pool3's h, w)."""
        pool3, pool4, fc7 = features
        score = self.score_pool4(pool4) + _upsample2_to(self.score_fr(fc7), pool4)  # stride 16
        return self.score_pool3(pool3) + _upsample2_to(score, pool3)  # stride 8


# ---------------------------------------------------------------------------------------------------
# Semantic network and presets
# ---------------------------------------------------------------------------------------------------


class SemanticNetwork(nn.Module):
    """backbone → head: normalised image → semantic logits at stride 8 (docs/algorithm.md §1).

    Args:
        backbone: a `TorchvisionBackbone` (its output is whatever `head` takes).
        head: features → (B, num_classes, ceil(H/8), ceil(W/8)) logits.
    """

    def __init__(self, *, backbone: TorchvisionBackbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, image: Tensor) -> Tensor:
        """image: float (B, 3, H, W), RGB in 0..1 normalised with IMAGENET_MEAN/STD (not done here).

        Returns:
            logits: (B, K+1, ceil(H/8), ceil(W/8)), background is channel 0; not yet upsampled.
        """
        if image.dim() != 4 or image.shape[1] != 3:
            raise InvalidArgumentError(f"image must have shape (B, 3, H, W), got {tuple(image.shape)}")
        return self.head(self.backbone(image))


def _resnet_psp(*, block, layers: Sequence[int], hidden_channels: int, num_classes: int):
    backbone = ResNet(block=block, layers=layers)
    head = PyramidPoolingHead(
        in_channels=backbone.out_channels, num_classes=num_classes, hidden_channels=hidden_channels
    )
    return backbone, head


def _vgg16_fcn8s(*, num_classes: int):
    backbone = VGG16()
    return backbone, FCN8sHead(num_classes=num_classes, in_channels=backbone.out_channels)


# resnet18's head fuses to 256 channels instead of PSPNet's 512: its features have 512 channels, not
# 2048, and a 512-wide 3×3 fusion would hold more parameters than layer4 itself.
_PRESETS = {
    "resnet18": lambda k: _resnet_psp(block=BasicBlock, layers=(2, 2, 2, 2), hidden_channels=256, num_classes=k),
    "resnet50": lambda k: _resnet_psp(block=Bottleneck, layers=(3, 4, 6, 3), hidden_channels=512, num_classes=k),
    "resnet101": lambda k: _resnet_psp(block=Bottleneck, layers=(3, 4, 23, 3), hidden_channels=512, num_classes=k),
    "vgg16_fcn8s": lambda k: _vgg16_fcn8s(num_classes=k),
}


def _build_semantic_network(
    *, backbone: TorchvisionBackbone, head: nn.Module, pretrained: PathLike | None
) -> SemanticNetwork:
    if pretrained is not None:
        load_torchvision_weights(backbone, pretrained)
    return SemanticNetwork(backbone=backbone, head=head)


def semantic_network(
    backbone: BackboneName, *, num_classes: int, pretrained: PathLike | None = None
) -> SemanticNetwork:
    """A semantic network preset: (B, 3, H, W) → (B, num_classes, ceil(H/8), ceil(W/8)) logits.

    - "resnet18", "resnet50", "resnet101": dilated ResNet (output stride 8) + `PyramidPoolingHead`
      (fusion width 512; 256 for resnet18).
    - "vgg16_fcn8s": `VGG16` as FCN + `FCN8sHead`.

    Args:
        backbone: the preset's name.
        num_classes: K+1, the object classes plus background (≥ 2).
        pretrained: a torchvision ImageNet state_dict file (e.g. resnet50-*.pth, vgg16-*.pth) to load
            into the backbone; None keeps torchvision's random initialisation (Kaiming convolutions).

    Raises:
        InvalidArgumentError (a ValueError): unknown backbone, num_classes < 2, or a `pretrained` file
            that does not match.
    """
    one_of("backbone", backbone, _PRESETS)
    num_classes = int_in("num_classes", num_classes, 2, rule="an int >= 2 (K classes + background)")
    features, head = _PRESETS[backbone](num_classes)
    return _build_semantic_network(backbone=features, head=head, pretrained=pretrained)
