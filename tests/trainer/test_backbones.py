"""Backbones and semantic networks: torchvision-compatible names, strict weight loading, stride-8 logits.

torchvision is not importable beside this torch, so its layouts are written out here from its
architecture: the whole resnet18 state_dict, and samples of resnet50, resnet101 and vgg16. The big
networks are built on the meta device (names and shapes only) or with uninitialised storage.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynseg.trainer.backbones import (
    IMAGENET_MEAN, IMAGENET_STD, VGG16, BasicBlock, Bottleneck, ResNet, SemanticNetwork, adaptive_average_pool,
    load_torchvision_weights, semantic_network,
)


def _bn(prefix: str, channels: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (f"{prefix}.weight", (channels,)), (f"{prefix}.bias", (channels,)), (f"{prefix}.running_mean", (channels,)),
        (f"{prefix}.running_var", (channels,)), (f"{prefix}.num_batches_tracked", ()),
    ]


def _basic(prefix: str, in_channels: int, channels: int, downsample: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    keys = [
        (f"{prefix}.conv1.weight", (channels, in_channels, 3, 3)), *_bn(f"{prefix}.bn1", channels),
        (f"{prefix}.conv2.weight", (channels, channels, 3, 3)), *_bn(f"{prefix}.bn2", channels),
    ]
    if downsample:
        keys += [
            (f"{prefix}.downsample.0.weight", (channels, in_channels, 1, 1)), *_bn(f"{prefix}.downsample.1", channels),
        ]
    return keys


# torchvision's resnet18().state_dict(), in its order: 122 entries.
RESNET18_TORCHVISION = [
    ("conv1.weight", (64, 3, 7, 7)), *_bn("bn1", 64),
    *_basic("layer1.0", 64, 64), *_basic("layer1.1", 64, 64),
    *_basic("layer2.0", 64, 128, downsample=True), *_basic("layer2.1", 128, 128),
    *_basic("layer3.0", 128, 256, downsample=True), *_basic("layer3.1", 256, 256),
    *_basic("layer4.0", 256, 512, downsample=True), *_basic("layer4.1", 512, 512),
    ("fc.weight", (1000, 512)), ("fc.bias", (1000,)),
]

# Samples of torchvision's resnet50 / resnet101 / vgg16 state_dicts, and their sizes (fc/classifier included).
RESNET50_SAMPLE = {
    "conv1.weight": (64, 3, 7, 7),
    "layer1.0.conv1.weight": (64, 64, 1, 1),
    "layer1.0.conv3.weight": (256, 64, 1, 1),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer2.3.bn3.running_var": (512,),
    "layer3.5.conv2.weight": (256, 256, 3, 3),
    "layer3.0.downsample.1.weight": (1024,),
    "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
    "layer4.2.conv3.weight": (2048, 512, 1, 1),
    "layer4.2.bn3.num_batches_tracked": (),
}
RESNET101_SAMPLE = {"layer3.22.conv3.weight": (1024, 256, 1, 1), "layer3.22.bn2.running_mean": (256,)}
VGG16_SAMPLE = {
    "features.0.weight": (64, 3, 3, 3),
    "features.5.weight": (128, 64, 3, 3),
    "features.14.bias": (256,),
    "features.28.weight": (512, 512, 3, 3),
    "classifier.0.weight": (4096, 25088),
    "classifier.3.weight": (4096, 4096),
}
TORCHVISION_SIZES = {"resnet50": 320, "resnet101": 626, "vgg16": 32}


def torchvision_state_dict(backbone: nn.Module, layout: dict, *, seed: int = 0, extra: dict | None = None) -> dict:
    """A fake torchvision file's content: random values in the torchvision shapes of `layout`."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.randint(0, 1000, shape, generator=generator)
        else:
            state[key] = torch.randn(shape, generator=generator)
    state.update(extra or {})
    return state


def resnet18() -> ResNet:
    return ResNet(block=BasicBlock, layers=(2, 2, 2, 2))


def on_meta(factory):
    with torch.device("meta"):
        return factory()


def torchvision_shapes(backbone) -> dict[str, tuple[int, ...]]:
    return {key: shape for key, (_, shape) in backbone.torchvision_layout().items()}


# --- names and shapes ------------------------------------------------------------------------------


def test_resnet18_state_dict_is_torchvision_without_fc():
    own = [(key, tuple(value.shape)) for key, value in resnet18().state_dict().items()]
    assert own == RESNET18_TORCHVISION[:-2]


def test_resnet18_loads_a_torchvision_state_dict_and_ignores_fc():
    backbone = resnet18()
    state = torchvision_state_dict(backbone, dict(RESNET18_TORCHVISION))
    backbone.load_torchvision_state_dict(state)
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("name, layers, sample", [
    ("resnet50", (3, 4, 6, 3), RESNET50_SAMPLE), ("resnet101", (3, 4, 23, 3), RESNET101_SAMPLE),
])
def test_big_resnets_have_torchvision_names_and_shapes(name, layers, sample):
    backbone = on_meta(lambda: ResNet(block=Bottleneck, layers=layers))
    shapes = torchvision_shapes(backbone)
    assert len(shapes) + 2 == TORCHVISION_SIZES[name]  # + fc.weight, fc.bias
    for key, shape in sample.items():
        assert shapes[key] == shape, key


def test_vgg16_has_torchvision_names_and_shapes():
    shapes = torchvision_shapes(on_meta(VGG16))
    assert len(shapes) + 2 == TORCHVISION_SIZES["vgg16"]  # + classifier.6.weight/bias
    assert [k for k in shapes if k.startswith("features.")] == [
        f"features.{i}.{p}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28) for p in ("weight", "bias")
    ]
    for key, shape in VGG16_SAMPLE.items():
        assert shapes[key] == shape, key


def test_vgg16_classifier_loads_into_fc6_and_fc7_as_equivalent_convolutions():
    backbone = on_meta(VGG16).to_empty(device="cpu")  # skip the 138M-parameter random init
    layout = torchvision_shapes(backbone)
    state = torchvision_state_dict(backbone, layout, extra={
        "classifier.6.weight": torch.zeros(1000, 4096), "classifier.6.bias": torch.zeros(1000),
    })
    backbone.load_torchvision_state_dict(state)
    assert torch.equal(backbone.features[28].weight, state["features.28.weight"])
    pool5 = torch.randn(1, 512, 7, 7)
    linear = F.linear(torch.flatten(pool5, 1), state["classifier.0.weight"], state["classifier.0.bias"])
    torch.testing.assert_close(backbone.fc6(pool5)[:, :, 3, 3], linear, rtol=1e-4, atol=1e-3)
    fc7_input = torch.randn(1, 4096, 1, 1)
    linear = F.linear(torch.flatten(fc7_input, 1), state["classifier.3.weight"], state["classifier.3.bias"])
    torch.testing.assert_close(backbone.fc7(fc7_input).flatten(1), linear, rtol=1e-4, atol=1e-4)


# --- loading files ---------------------------------------------------------------------------------


@pytest.fixture
def resnet18_file(tmp_path):
    state = torchvision_state_dict(resnet18(), dict(RESNET18_TORCHVISION), seed=5)

    def write(edit=lambda state: state):
        path = tmp_path / "resnet18-fake.pth"
        torch.save(edit(dict(state)), path)
        return path, state

    return write


def test_a_saved_state_dict_round_trips_exactly(resnet18_file):
    path, state = resnet18_file()
    network = semantic_network("resnet18", num_classes=3, pretrained=path)
    for key, value in network.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_missing_num_batches_tracked_is_tolerated_as_in_old_torchvision_files(resnet18_file):
    path, state = resnet18_file(lambda s: {k: v for k, v in s.items() if not k.endswith("num_batches_tracked")})
    backbone = resnet18()
    load_torchvision_weights(backbone, path)
    assert torch.equal(backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert backbone.layer4[1].bn2.num_batches_tracked.item() == 0


def _rename(state, old, new):
    state[new] = state.pop(old)
    return state


@pytest.mark.parametrize("edit, named", [
    (
        lambda s: _rename(s, "layer3.1.conv2.weight", "layer3.1.conv9.weight"),
        ["1 missing (first: layer3.1.conv2.weight)", "1 unexpected (first: layer3.1.conv9.weight)"],
    ),
    (lambda s: {**s, "layer2.0.bn1.weight": torch.ones(7)}, ["1 of the wrong shape (first: layer2.0.bn1.weight (7,)"]),
    (lambda s: {k: v for k, v in s.items() if k != "bn1.bias"}, ["1 missing (first: bn1.bias)"]),
    (lambda s: {**s, "extra.weight": torch.ones(1)}, ["1 unexpected (first: extra.weight)"]),
    (lambda s: {f"module.{k}": v for k, v in s.items()}, ["unexpected (first: module.conv1.weight)"]),
    (lambda s: {**s, "layer2.0.bn1.weight": torch.full((128,), float("nan"))},
     ["layer2.0.bn1.weight holds a non-finite value"]),
    (lambda s: {**s, "conv1.weight": s["conv1.weight"].to(torch.int64)}, ["conv1.weight holds torch.int64 values"]),
])
def test_a_mismatched_file_raises_naming_the_file_and_the_keys(resnet18_file, edit, named):
    path, _ = resnet18_file(edit)
    backbone = resnet18()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(ValueError) as error:
        load_torchvision_weights(backbone, path)
    for text in [str(path), *named]:
        assert text in str(error.value)
    assert len(str(error.value)) < 400  # counts and a first key, not every key of the file
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())  # nothing half-loaded


def test_a_file_that_is_not_a_state_dict_raises(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "model": {"conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="checkpoint.pth"):
        load_torchvision_weights(resnet18(), path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="checkpoint.pth"):
        load_torchvision_weights(resnet18(), path)
    path.write_text('{"weights": [1, 2, 3]}')  # torch's refusal runs to many lines, with unsafe advice
    with pytest.raises(ValueError, match="checkpoint.pth") as raised:
        load_torchvision_weights(resnet18(), path)
    assert "\n" not in str(raised.value) and "weights_only" not in str(raised.value)


# --- the semantic network --------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(64, 80), (65, 97), (8, 8), (1, 1), (33, 17)])
def test_resnet18_logits_have_stride_8_rounded_up(height, width):
    network = semantic_network("resnet18", num_classes=5).eval()
    with torch.no_grad():
        logits = network(torch.randn(2, 3, height, width))
    assert logits.shape == (2, 5, math.ceil(height / 8), math.ceil(width / 8))


def test_vgg16_fcn8s_logits_have_stride_8_rounded_up():
    torch.manual_seed(0)
    network = semantic_network("vgg16_fcn8s", num_classes=4).eval()
    for conv in (network.head.score_pool3, network.head.score_pool4, network.head.score_fr):
        nn.init.normal_(conv.weight, std=0.01)  # nonzero, so all three paths must line up
    with torch.no_grad():
        logits = network(torch.randn(1, 3, 65, 97))
    assert logits.shape == (1, 4, 9, 13)
    assert bool(torch.isfinite(logits).all())


def test_resnet50_layer3_and_layer4_are_dilated_with_torchvisions_first_block_rule():
    backbone = on_meta(lambda: ResNet(block=Bottleneck, layers=(3, 4, 6, 3)))
    assert backbone.output_stride == 8
    assert backbone.layer2[0].conv2.stride == (2, 2)
    for layer, dilations in ((backbone.layer3, [1] + [2] * 5), (backbone.layer4, [2, 4, 4])):
        assert [block.conv2.dilation[0] for block in layer] == dilations
        assert [block.conv2.padding[0] for block in layer] == dilations
        for conv in layer.modules():
            if isinstance(conv, nn.Conv2d):
                assert conv.stride == (1, 1)


def test_gradients_flow_from_the_logits_to_conv1():
    torch.manual_seed(0)
    network = semantic_network("resnet18", num_classes=3).train()  # BN needs > 1 value per channel: batch 2
    logits = network(torch.randn(2, 3, 64, 80))
    target = torch.randint(0, 3, logits.shape[:1] + logits.shape[2:])
    F.cross_entropy(logits, target).backward()
    gradient = network.backbone.conv1.weight.grad
    assert gradient is not None and bool(torch.isfinite(gradient).all()) and gradient.abs().sum() > 0


def test_random_init_is_torchvisions():
    backbone = resnet18()
    fan_out = 64 * 7 * 7
    assert backbone.conv1.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    assert torch.equal(backbone.bn1.weight, torch.ones(64)) and torch.equal(backbone.bn1.bias, torch.zeros(64))


@pytest.mark.parametrize("height, width", [(7, 13), (1, 1), (6, 6), (4, 29)])
def test_adaptive_average_pool_matches_torch(height, width):
    x = torch.randn(2, 3, height, width)
    for bins in (1, 2, 3, 6):
        torch.testing.assert_close(adaptive_average_pool(x, bins), F.adaptive_avg_pool2d(x, bins))


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="backbone must be one of"):
        semantic_network("resnet34", num_classes=3)
    for bad in (1, True, 2.0):
        with pytest.raises(ValueError, match="num_classes"):
            semantic_network("resnet18", num_classes=bad)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        semantic_network("resnet18", num_classes=3)(torch.zeros(3, 8, 8))


def test_normalisation_constants_are_imagenets_and_the_network_holds_none():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    network = semantic_network("resnet18", num_classes=2)
    assert isinstance(network, SemanticNetwork)
    assert not [k for k in network.state_dict() if "mean" in k and not k.endswith("running_mean")]


def test_resnet18_network_exports_with_a_dynamic_image_size():
    # The pyramid pooling is written without adaptive pooling so that this works (see adaptive_average_pool).
    network = semantic_network("resnet18", num_classes=3).eval()
    rows, cols = torch.export.Dim("rows", min=2, max=128), torch.export.Dim("cols", min=2, max=128)
    program = torch.export.export(network, (torch.randn(1, 3, 64, 96),), dynamic_shapes=({2: 8 * rows, 3: 8 * cols},))
    image = torch.randn(1, 3, 40, 136)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(image), network(image))
