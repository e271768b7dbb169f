"""Shared fixtures: smooth synthetic images and unaries, the shipped photos, pydensecrf as an oracle,
small C libraries built for a test (stand-ins for a native library, or a refusal preloaded), and a full
disk.

Parity tests use smooth inputs on purpose: on high-contrast noise two correct dense-CRF implementations
drift apart to ~1e-4 after a few iterations (docs/algorithm.md §3), so noise would force loose tolerances.
The fixtures are factories, so each test picks its own sizes and seeds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dynseg.sdk import samples
from dynseg.sdk.files import partial_path


def _smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.full((height, width, 3), 40.0)
    for _ in range(4):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        sigma = rng.uniform(0.15, 0.35) * max(height, width)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma * sigma))
        image += blob[..., None] * rng.uniform(0, 255, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def _smooth_unary(n_labels: int, height: int, width: int, seed: int = 1, amplitude: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    unary = np.empty((n_labels, height, width))
    for label in range(n_labels):
        a, b, c, phase = rng.uniform(-1, 1, 4)
        unary[label] = amplitude * (np.sin(6 * a * xx / width + phase) * np.cos(6 * b * yy / height) + c / 2)
    return unary.astype(np.float32)


def _field_unary(n_labels: int, height: int, width: int, seed: int = 2, cells: tuple[int, int] = (5, 7)) -> np.ndarray:
    """Coarse Gaussian noise (L, 5, 7), std 3, upsampled bilinearly (corners aligned) to (L, H, W)."""
    rng = np.random.default_rng(seed)
    rows, cols = cells
    coarse = rng.normal(0.0, 3.0, (n_labels, rows, cols))
    ys, xs = np.linspace(0, rows - 1, height), np.linspace(0, cols - 1, width)
    y0 = np.minimum(ys.astype(int), rows - 2)
    x0 = np.minimum(xs.astype(int), cols - 2)
    fy, fx = (ys - y0)[:, None], xs - x0

    def at(dy: int, dx: int) -> np.ndarray:
        return coarse[:, y0 + dy][:, :, x0 + dx]  # (L, H, W)

    top = at(0, 0) * (1 - fx) + at(0, 1) * fx
    bottom = at(1, 0) * (1 - fx) + at(1, 1) * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


@pytest.fixture
def smooth_image() -> Callable[..., np.ndarray]:
    """smooth_image(height, width, seed=0) -> uint8 (H, W, 3): a few wide colour blobs on grey."""
    return _smooth_image


@pytest.fixture
def smooth_unary() -> Callable[..., np.ndarray]:
    """smooth_unary(L, height, width, seed=1, amplitude=2.0) -> float32 (L, H, W) logits made of
    low-frequency sinusoids (peak-to-peak about 3 * amplitude)."""
    return _smooth_unary


@pytest.fixture
def field_unary() -> Callable[..., np.ndarray]:
    """field_unary(L, height, width, seed=2) -> float32 (L, H, W): a coarse random field upsampled
    smoothly, a stand-in for a network's upsampled logits on any photo."""
    return _field_unary


@pytest.fixture(scope="session")
def photo() -> Callable[[str], np.ndarray]:
    """photo(name) -> uint8 (H, W, 3), one of dynseg.sdk.samples.NAMES (loaded once per session)."""
    cache: dict[str, np.ndarray] = {}

    def load(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = samples.load(name)
        return cache[name].copy()

    return load


@pytest.fixture(scope="session")
def learned_looking_network() -> Callable[..., object]:
    """learned_looking_network(seed=0) -> a resnet18 network of the classes ("cat", "cup", "person")
    whose CRF and instance parameters look trained where a fresh network's are symmetric: distinct
    shape templates (identical ones tie exactly), kernel weight matrices and a compatibility off the
    identity, unequal detection weights. A runtime that dropped the compatibility, transposed a weight
    matrix or swapped the two detection weights would compute something else. Needs torch."""

    def make(seed: int = 0):
        import torch

        from dynseg.trainer.model.instance import InstanceConfig
        from dynseg.trainer.model.network import ModelConfig, build_model

        torch.manual_seed(seed)
        network = build_model(ModelConfig(backbone="resnet18", class_names=("cat", "cup", "person"),
                                          instance=InstanceConfig(templates_per_group=4, template_size=16)))
        generator = torch.Generator().manual_seed(seed + 1)
        noise = lambda like, scale: (torch.rand(like.shape, generator=generator) * 2 - 1) * scale
        crf = network.semantic_crf
        with torch.no_grad():
            network.instance_unaries.templates.uniform_(0.0, 1.0, generator=generator)
            crf.compatibility.add_(noise(crf.compatibility, 0.3))
            crf.spatial_weight.add_(noise(crf.spatial_weight, 0.5))
            crf.bilateral_weight.add_(noise(crf.bilateral_weight, 0.5))
            crf.detection_x.fill_(0.6)
            crf.detection_y.fill_(1.9)
        return network.eval()

    return make


@pytest.fixture
def pydensecrf_q() -> Callable[..., np.ndarray]:
    """pydensecrf_q(unary, image, iterations, spatial, bilateral, normalization) -> float32 (L, H, W):
    pydensecrf's Q for dynseg's parameters (unary energy = -logits; spatial kernel added first)."""
    # the oracle is a [dev] dependency: missing, its tests must fail, not skip out of sight
    from pydensecrf import densecrf as dcrf

    def run(unary, image, iterations, spatial, bilateral, normalization):
        n_labels, height, width = unary.shape
        crf = dcrf.DenseCRF2D(width, height, n_labels)
        crf.setUnaryEnergy(np.ascontiguousarray(-unary.reshape(n_labels, -1), dtype=np.float32))
        kind = {"after": dcrf.NORMALIZE_AFTER, "symmetric": dcrf.NORMALIZE_SYMMETRIC}[normalization]
        if spatial is not None:
            crf.addPairwiseGaussian(sxy=spatial[0], compat=spatial[1], normalization=kind)
        if bilateral is not None:
            crf.addPairwiseBilateral(
                sxy=bilateral[0],
                srgb=bilateral[1],
                rgbim=np.array(image, dtype=np.uint8, order="C", copy=True),
                compat=bilateral[2],
                normalization=kind,
            )
        return np.asarray(crf.inference(iterations), dtype=np.float32).reshape(n_labels, height, width)

    return run


def _tensorrt_header_dirs() -> list[Path]:
    """$DYNSEG_TENSORRT_HEADERS (directories separated by os.pathsep), else each folder of trt-headers/
    beside the checkout (where docs/tensorrt.md suggests fetching them)."""
    if os.environ.get("DYNSEG_TENSORRT_HEADERS"):
        return [Path(p) for p in os.environ["DYNSEG_TENSORRT_HEADERS"].split(os.pathsep) if p]
    beside = Path(__file__).resolve().parents[1].parent / "trt-headers"
    return sorted(p for p in beside.iterdir() if (p / "NvInferRuntime.h").is_file()) if beside.is_dir() else []


@pytest.fixture(scope="session", ids=lambda p: p.name if p else "none", params=_tensorrt_header_dirs() or [
    pytest.param(None, marks=pytest.mark.skip(reason="no TensorRT headers: set DYNSEG_TENSORRT_HEADERS to folders "
                                                     "of TensorRT's include/ (docs/tensorrt.md); CI has none"))])
def tensorrt_headers(request) -> Path:
    """A folder of TensorRT's public headers (each one found is a parameter: TensorRT 10 and 11)."""
    return request.param


@pytest.fixture
def c_library(tmp_path) -> Callable[[str, str], Path]:
    """c_library(name, source): the shared library lib<name>.so built from C `source` in tmp_path; the test
    is skipped where no C compiler is on the PATH."""
    compiler = shutil.which("cc") or shutil.which("gcc")

    def build(name: str, source: str) -> Path:
        if compiler is None:
            pytest.skip("needs a C compiler to build a stand-in library")
        (tmp_path / f"{name}.c").write_text(source)
        library = tmp_path / f"lib{name}.so"
        subprocess.run([compiler, "-shared", "-fPIC", str(tmp_path / f"{name}.c"), "-o", str(library)], check=True)
        return library

    return build


@pytest.fixture
def full_disk() -> Callable[[Path], Path]:
    """full_disk(path) -> the link it made: the next `dynseg.sdk.files.write_whole` of `path` in this process
    meets a full disk, /dev/full (which answers every write with ENOSPC) linked where the hidden partial
    copy goes. Skips where there is no /dev/full."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (Linux) to stand for a full disk")

    def under(path: Path) -> Path:
        partial = partial_path(path)
        partial.symlink_to("/dev/full")
        return partial

    return under
