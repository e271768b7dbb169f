"""The native CRF kernels as a torch op with autograd: what training runs on.

`torch.ops.dynseg.mean_field` wraps the kernel library's forward and backward
(plugins/include/dynseg_crf.h) through `dynseg.sdk._native`, on the CPU for CPU tensors and on the
GPU (the CUDA entry points, on torch's current stream, no copies) for CUDA tensors. Its torch-level
front ends: `dense_crf_native` takes `dense_crf_reference`'s parameters (plus `threads`);
`mean_field_native` takes the thetas and the image and builds its lattices itself, where
`meanfield.mean_field_reference` (the readable definition the kernels are tested against) takes
lattices already built; `mean_field_native_with_detections` adds the semantic CRF's detection potential,
forward and backward in the library (its readable definition: `semantic_mean_field_reference` in
trainer/model/semantic_crf.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union, overload

import numpy as np
import torch
from torch import Tensor

from dynseg.sdk import _native
from dynseg.sdk.checks import check_iterations, check_normalization, check_threads
from dynseg.sdk.crf import check_image_shape, gaussian_kernels
from dynseg.sdk.errors import InvalidArgumentError
from dynseg.sdk.checks import finite_float32, positive_in_float32

__all__ = ["GaussianKernel", "DetectionPotential", "crf_kernels", "mean_field_native",
           "mean_field_native_with_detections", "dense_crf_native"]

# (theta_xy, theta_color, weight): theta_color = 0 for a spatial kernel; weight a float, a 0-d tensor
# (label-agnostic) or an (L, L) tensor.
GaussianKernel = tuple[float, float, Union[float, Tensor]]


def crf_kernels(*, theta_spatial: float, theta_bilateral_xy: float, theta_bilateral_rgb: float,
                spatial_weight: float | Tensor, bilateral_weight: float | Tensor) -> list[GaussianKernel]:
    """The two kernels of each of the network's CRFs, spatial then bilateral (the paper's θγ, θα, θβ)."""
    return [(theta_spatial, 0.0, spatial_weight), (theta_bilateral_xy, theta_bilateral_rgb, bilateral_weight)]


def _on_device(tensor: Tensor) -> _native.DeviceArray:
    """A CUDA tensor (float32 or int64, contiguous) as the library's CUDA calls take it."""
    return _native.DeviceArray.of(tensor, "a CRF tensor", dtype=np.int64 if tensor.dtype == torch.int64 else np.float32)


class _Call:
    """One native call over tensors on the unary's device, as the library reads them (float32 or int64,
    contiguous; kept alive here): numpy views of them for the CPU functions, DeviceArrays for the CUDA
    ones. `detections` is [] or [boxes, labels, scores, detection_x, detection_y]; for a backward call
    with them, `grad_recalibrated` and whether the gradients of w_x and w_y are wanted."""

    def __init__(self, unary: Tensor, image: Tensor | None, theta_xy: list[float], theta_color: list[float],
                 weights: Sequence[Tensor], compat: Tensor | None, normalization: str, iterations: int, threads: int,
                 detections: Sequence[Tensor], score_ceiling: float, epsilon: float, *,
                 grad_recalibrated: Tensor | None = None, want_detection: bool = False) -> None:
        self.device = unary.device
        self.tensors: list[Tensor] = []  # the problem points into them
        held = self.held
        self.unary = held(unary)
        # The registered op is public (torch.ops.dynseg.mean_field): its arguments are checked here too.
        if self.unary.dim() != 3:
            raise InvalidArgumentError(f"unary must be (L, H, W), got {tuple(self.unary.shape)}")
        if not len(theta_xy) == len(theta_color) == len(weights):
            raise InvalidArgumentError(f"theta_xy, theta_color and weights must have one entry per kernel, got "
                                       f"{len(theta_xy)}, {len(theta_color)} and {len(weights)}")
        self.weights = [held(w.reshape(1) if w.numel() == 1 else w) for w in weights]
        self.compat = held(compat)
        self.recalibrated: Tensor | None = None
        self.grad_detection: list[Tensor] = []
        potential = None
        if detections:
            if len(detections) != 5:
                raise InvalidArgumentError(f"detections must be [] or [boxes, labels, scores, detection_x, "
                                           f"detection_y], got {len(detections)} tensors")
            boxes, labels, scores, w_x, w_y = detections
            if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
                raise InvalidArgumentError(f"detections' labels must be integers, got {labels.dtype}")  # not truncated
            self.recalibrated = held(torch.empty(boxes.shape[0]))
            # zeros: with no detection (D = 0) the library leaves them, and their gradient is 0
            self.grad_detection = [held(torch.zeros(1)) for _ in range(2)] if want_detection else []
            grad_x, grad_y = self.grad_detection or (None, None)
            potential = _native.DetectionPotential(
                boxes=self.array(held(boxes)), labels=self.array(held(labels, torch.int64)),
                scores=self.array(held(scores)), detection_x=self.array(held(w_x.reshape(1))),
                detection_y=self.array(held(w_y.reshape(1))), score_ceiling=score_ceiling, epsilon=epsilon,
                recalibrated=self.array(self.recalibrated), grad_recalibrated=self.array(held(grad_recalibrated)),
                grad_detection_x=self.array(grad_x), grad_detection_y=self.array(grad_y),
            )
        num_labels, height, width = self.unary.shape
        kernels = [_native.Kernel(t, c, self.array(w)) for t, c, w in zip(theta_xy, theta_color, self.weights)]
        self.problem = _native.Problem(
            num_labels, height, width, self.array(held(image)), kernels, compat=self.array(self.compat),
            normalization=normalization, iterations=iterations, output=_native.Output.LOGITS, threads=threads,
            detection_potential=potential,
        )

    @overload
    def held(self, tensor: Tensor, dtype: torch.dtype = ...) -> Tensor: ...
    @overload
    def held(self, tensor: None, dtype: torch.dtype = ...) -> None: ...
    @overload
    def held(self, tensor: Tensor | None, dtype: torch.dtype = ...) -> Tensor | None: ...

    def held(self, tensor: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """`tensor` as the library reads it, on the call's device, kept alive as long as the call."""
        if tensor is not None:
            tensor = tensor.detach().to(self.device, dtype).contiguous()
            self.tensors.append(tensor)
        return tensor

    @overload
    def array(self, tensor: Tensor) -> np.ndarray | _native.DeviceArray: ...
    @overload
    def array(self, tensor: Tensor | None) -> np.ndarray | _native.DeviceArray | None: ...

    def array(self, tensor: Tensor | None) -> np.ndarray | _native.DeviceArray | None:
        """What the library is handed for a held tensor: a numpy view of it, or a DeviceArray on a GPU."""
        if tensor is None:
            return None
        return _on_device(tensor) if self.device.type == "cuda" else tensor.numpy()

    def workspace(self, pass_: _native.Pass) -> tuple[int, int, int]:
        """A CUDA call's workspace (address, bytes) and stream, torch's current one."""
        nbytes = self.problem.workspace_size_cuda(pass_)
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.tensors.append(workspace)
        return workspace.data_ptr(), nbytes, torch.cuda.current_stream(self.device).cuda_stream

    def forward(self) -> tuple[Tensor, Tensor]:
        """(logits, recalibrated scores (D,), empty without detections)."""
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                logits = torch.empty_like(self.unary)
                self.problem.forward_cuda(_on_device(self.unary), _on_device(logits), *self.workspace(
                    _native.Pass.FORWARD))
        else:
            logits = torch.from_numpy(self.problem.forward(self.unary.numpy()))
        return logits, self.unary.new_empty(0) if self.recalibrated is None else self.recalibrated

    def backward(self, grad_logits: Tensor, want_weights: list[bool],
                 want_compat: bool) -> tuple[Tensor, list[Tensor | None], Tensor | None]:
        """(grad_unary, grad_weights, grad_compat), None where not wanted, for dLoss/dlogits `grad_logits`
        (and the grad_recalibrated given); `grad_detection` receives the gradients of w_x and w_y when
        they were asked for."""
        grad = self.held(grad_logits)
        if self.device.type != "cuda":
            arrays = self.problem.backward(self.unary.numpy(), grad.numpy(), want_weights, want_compat)
            as_tensor = lambda array: None if array is None else torch.from_numpy(array)
            return torch.from_numpy(arrays[0]), [as_tensor(g) for g in arrays[1]], as_tensor(arrays[2])
        with torch.cuda.device(self.device):
            empty = lambda wanted, like: torch.empty(like.shape, device=self.device) if wanted else None
            grad_unary = torch.empty_like(self.unary)
            grad_weights = [empty(wanted, w) for w, wanted in zip(self.weights, want_weights)]
            grad_compat = empty(want_compat and self.compat is not None, self.compat)
            device = lambda tensor: None if tensor is None else _on_device(tensor)
            self.problem.backward_cuda(_on_device(self.unary), _on_device(grad), _on_device(grad_unary),
                                       [device(g) for g in grad_weights], device(grad_compat),
                                       *self.workspace(_native.Pass.BACKWARD))
        return grad_unary, grad_weights, grad_compat


@torch.library.custom_op("dynseg::mean_field", mutates_args=(), device_types=("cpu", "cuda"))
def _mean_field(
    unary: Tensor,
    image: Optional[Tensor],
    theta_xy: list[float],
    theta_color: list[float],
    weights: list[Tensor],
    compat: Optional[Tensor],
    normalization: str,
    iterations: int,
    threads: int,
    detections: list[Tensor],
    score_ceiling: float,
    epsilon: float,
) -> tuple[Tensor, Tensor]:
    """(logits, recalibrated scores); detections: [] or [boxes, labels, scores, detection_x, detection_y]."""
    logits, recalibrated = _Call(unary, image, theta_xy, theta_color, weights, compat, normalization, iterations,
                                 threads, detections, score_ceiling, epsilon).forward()
    return logits.to(unary.dtype), recalibrated.to(unary.dtype)


@_mean_field.register_fake
def _(unary, image, theta_xy, theta_color, weights, compat, normalization, iterations, threads, detections,
      score_ceiling, epsilon):
    return torch.empty_like(unary), unary.new_empty(detections[0].shape[0] if detections else 0)


# The backward is an op of its own, so that torch.compile traces it as one opaque call (with the fake
# below for shapes) rather than into the numpy and ctypes calls that run the kernels.
@torch.library.custom_op("dynseg::mean_field_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _mean_field_backward(
    grad_logits: Tensor,
    grad_recalibrated: Tensor,
    unary: Tensor,
    image: Optional[Tensor],
    theta_xy: list[float],
    theta_color: list[float],
    weights: list[Tensor],
    compat: Optional[Tensor],
    normalization: str,
    iterations: int,
    threads: int,
    detections: list[Tensor],
    score_ceiling: float,
    epsilon: float,
    want_weights: list[bool],
    want_compat: bool,
    want_detection: bool,
) -> list[Tensor]:
    """[grad_unary, grad_compat, grad_detection_x, grad_detection_y, *grad_weights]; a gradient not wanted
    is an empty tensor (an op returns no None)."""
    call = _Call(unary, image, theta_xy, theta_color, weights, compat, normalization, iterations, threads, detections,
                 score_ceiling, epsilon, grad_recalibrated=grad_recalibrated if detections else None,
                 want_detection=want_detection and bool(detections))
    if len(want_weights) != len(weights):
        raise InvalidArgumentError(f"want_weights must have one entry per kernel ({len(weights)}), got "
                                   f"{len(want_weights)}")
    grad_unary, grad_weights, grad_compat = call.backward(grad_logits, want_weights, want_compat)
    grad_x, grad_y = call.grad_detection or (None, None)
    w_x, w_y = detections[3:5] if detections else (None, None)
    grads = [grad_unary, grad_compat, grad_x, grad_y, *grad_weights]
    return [unary.new_empty(0) if g is None or like is None else g.reshape(like.shape).to(like.device, like.dtype)
            for g, like in zip(grads, (unary, compat, w_x, w_y, *weights))]


@_mean_field_backward.register_fake
def _(grad_logits, grad_recalibrated, unary, image, theta_xy, theta_color, weights, compat, normalization,
      iterations, threads, detections, score_ceiling, epsilon, want_weights, want_compat, want_detection):
    gradient = lambda like, wanted: torch.empty_like(like) if wanted and like is not None else unary.new_empty(0)
    w_x, w_y = detections[3:5] if detections else (None, None)
    return [torch.empty_like(unary), gradient(compat, want_compat), gradient(w_x, want_detection),
            gradient(w_y, want_detection), *[gradient(w, wanted) for w, wanted in zip(weights, want_weights)]]


def _setup_context(ctx, inputs, output):
    ctx.inputs = inputs
    unary, image, _, _, weights, compat, _, _, _, detections, _, _ = inputs
    ctx.num_weights = len(weights)
    ctx.save_for_backward(unary, image, compat, *weights, *detections)


def _backward(ctx, grad_logits, grad_recalibrated):
    if torch.is_grad_enabled():  # on in a backward only under create_graph=True
        raise NotImplementedError("dynseg::mean_field has no double backward: its gradient is computed by the "
                                  "native library, outside autograd (use mean_field_reference for it)")
    unary, image, compat, *rest = ctx.saved_tensors
    weights, detections = rest[:ctx.num_weights], rest[ctx.num_weights:]
    _, _, theta_xy, theta_color, _, _, normalization, iterations, threads, _, score_ceiling, epsilon = ctx.inputs
    # a list input's entry of needs_input_grad is a list: one flag per tensor
    want_weights = [bool(wanted) for wanted in ctx.needs_input_grad[4]]
    want_compat = compat is not None and bool(ctx.needs_input_grad[5])
    want_w = [bool(wanted) for wanted in ctx.needs_input_grad[9][3:5]]  # w_x, w_y
    want_detection = any(want_w)
    grad_unary, grad_compat, grad_x, grad_y, *grad_weights = _mean_field_backward(
        grad_logits, grad_recalibrated, unary, image, theta_xy, theta_color, weights, compat, normalization,
        iterations, threads, detections, score_ceiling, epsilon, want_weights, want_compat, want_detection)
    thetas: list | None = [] if not theta_xy else None  # torch reads an empty list as one of tensors: []
    grad_detections = [None, None, None, *(g if wanted else None for g, wanted in zip((grad_x, grad_y), want_w))]
    return (
        grad_unary,
        None, thetas, thetas,
        [g if wanted else None for g, wanted in zip(grad_weights, want_weights)],
        grad_compat if want_compat else None,
        None, None, None,
        grad_detections if detections else [],
        None, None,
    )


_mean_field.register_autograd(_backward, setup_context=_setup_context)


def _check_device(name: str, tensor: object) -> None:
    """Refuses a tensor on a device the kernels cannot read (a meta tensor would send the op to its
    fake kernel, whose result is uninitialised memory)."""
    if isinstance(tensor, Tensor) and tensor.device.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"{name} must be a CPU or CUDA tensor, got one on {tensor.device}")


@dataclass(frozen=True)
class DetectionPotential:
    """The detection potential's inputs (docs/algorithm.md §4; dynseg_detections in dynseg_crf.h):
    boxes (D, 4) xyxy, integer-valued, inclusive, each with a pixel in the image; labels (D,) integers
    in 0..L-1; scores (D,) >= 0, the detector's (constants); detection_x and detection_y, the 0-d w_x and
    w_y (differentiable); score_ceiling s_max > 0; epsilon in [0, 1). The library checks the values
    (those on the CPU; on a GPU a bad one turns its outputs NaN, which is reported)."""

    boxes: Tensor
    labels: Tensor
    scores: Tensor
    detection_x: Tensor
    detection_y: Tensor
    score_ceiling: float
    epsilon: float


def mean_field_native(
    unary: Tensor,
    image: Tensor | None,
    kernels: Sequence[GaussianKernel],
    *,
    compat: Tensor | None = None,
    normalization: str = "after",
    iterations: int = 5,
    threads: int | None = None,
) -> Tensor:
    """Mean-field inference on the native kernels: `meanfield.mean_field_reference`'s computation, from
    thetas and the image rather than from lattices already built.

    Args:
        unary: (L, H, W) float32 logits, a CPU or a CUDA tensor (the other tensors are moved to its device).
        image: (C, H, W) float32 colour planes (0..255 units, as the thetas), or None when no kernel
            is bilateral.
        kernels: (theta_xy, theta_color, weight) each; theta_color = 0 makes a spatial kernel over
            (x/theta_xy, y/theta_xy), else the features add (c/theta_color for each colour plane).
            weight: a float or 0-d tensor (label-agnostic) or an (L, L) tensor.
        compat: None (Potts, mu = -I: a positive weight rewards agreeing labels), (L,) diagonal or
            (L, L) full mu, in L = U - mu · m.
        normalization: "after" or "symmetric".
        iterations: T >= 0.
        threads: None for every core; results are bitwise identical for any count.

    Returns:
        (L, H, W) logits of the last iteration. Differentiable w.r.t. unary, tensor weights and compat
        (not the image: its gradient is None). Traceable by torch.compile, forward and backward, as
        opaque ops.
    """
    logits, _ = _mean_field_call(unary, image, kernels, compat, normalization, iterations, threads, None)
    return logits


def mean_field_native_with_detections(
    unary: Tensor,
    image: Tensor | None,
    kernels: Sequence[GaussianKernel],
    detections: DetectionPotential,
    *,
    compat: Tensor | None = None,
    normalization: str = "after",
    iterations: int = 5,
    threads: int | None = None,
) -> tuple[Tensor, Tensor]:
    """`mean_field_native` with the detection potential added to every iteration's logits, in one call
    that builds each lattice once, forward and backward.

    Returns:
        (L, H, W) logits of the last iteration and (D,) recalibrated scores Q(Y_d = 1) (the scores when
        T = 0). Differentiable as `mean_field_native`'s, and w.r.t. detections.detection_x and
        detection_y, through both outputs.
    """
    if not isinstance(detections, DetectionPotential):
        raise InvalidArgumentError(f"detections must be a DetectionPotential, got {type(detections).__name__}")
    return _mean_field_call(unary, image, kernels, compat, normalization, iterations, threads, detections)


def _mean_field_call(
    unary: Tensor, image: Tensor | None, kernels: Sequence[GaussianKernel], compat: Tensor | None,
    normalization: str, iterations: int, threads: int | None, detections: DetectionPotential | None,
) -> tuple[Tensor, Tensor]:
    """The front ends' checks, then the op."""
    if not isinstance(unary, Tensor) or unary.dim() != 3:
        raise InvalidArgumentError(f"unary must be an (L, H, W) tensor, got {getattr(unary, 'shape', type(unary))}")
    _check_device("unary", unary)
    if unary.is_cuda:
        _native.check_cuda_device(unary.device.index or 0)
    if unary.dtype != torch.float32:
        raise InvalidArgumentError(f"unary must be float32, got {unary.dtype}")
    if 0 in unary.shape:
        raise InvalidArgumentError(f"unary must have L, H, W >= 1, got {tuple(unary.shape)}")
    num_labels = unary.shape[0]
    if image is not None and not isinstance(image, Tensor):
        raise InvalidArgumentError(f"image must be a (C, H, W) tensor or None, got {type(image).__name__}")
    for name, tensor in (("image", image), ("compat", compat)):  # converted to float32 on the way: no bool, complex
        if isinstance(tensor, Tensor) and (tensor.dtype.is_complex or tensor.dtype == torch.bool):
            raise InvalidArgumentError(f"{name} must hold real numbers, got {tensor.dtype}")
    _check_device("image", image)
    _check_device("compat", compat)
    if isinstance(kernels, (str, bytes)) or not isinstance(kernels, Sequence):
        raise InvalidArgumentError(f"kernels must be a sequence of (theta_xy, theta_color, weight), got {kernels!r}")
    theta_xys, theta_colors, weights = [], [], []
    for index, kernel in enumerate(kernels):
        if isinstance(kernel, (str, bytes)) or not isinstance(kernel, Sequence) or len(kernel) != 3:
            raise InvalidArgumentError(f"kernels[{index}] must be (theta_xy, theta_color, weight), got {kernel!r}")
        theta_xy, theta_color, weight = kernel
        # checked as the float32 the library reads: 1e39 is inf there, 1e-46 is 0
        for name, theta, rule, holds in (("theta_xy", theta_xy, "> 0", positive_in_float32),
                                         ("theta_color", theta_color, ">= 0", lambda number: number >= 0)):
            number = finite_float32(theta)
            if number is None or not holds(number):
                raise InvalidArgumentError(f"kernels[{index}].{name} must be a finite float32 number {rule}, "
                                           f"got {theta!r}")
        real_tensor = isinstance(weight, Tensor) and not (weight.dtype.is_complex or weight.dtype == torch.bool)
        if not real_tensor and finite_float32(weight) is None:
            raise InvalidArgumentError(f"kernels[{index}] weight must be a finite float32 number or a real tensor, "
                                       f"got {weight!r}")
        _check_device(f"kernels[{index}] weight", weight)
        weight = torch.as_tensor(weight, dtype=torch.float32)
        if weight.numel() != 1 and tuple(weight.shape) != (num_labels, num_labels):
            raise InvalidArgumentError(f"kernels[{index}] weight must be a scalar or ({num_labels}, {num_labels}), "
                                       f"got {tuple(weight.shape)}")
        theta_xys.append(float(theta_xy))
        theta_colors.append(float(theta_color))
        weights.append(weight)
    compat_shapes = ((num_labels,), (num_labels, num_labels))
    if compat is not None and (not isinstance(compat, Tensor) or tuple(compat.shape) not in compat_shapes):
        raise InvalidArgumentError(f"compat must be None or a ({num_labels},) or ({num_labels}, {num_labels}) tensor, "
                                   f"got {getattr(compat, 'shape', compat)!r}")
    flat: list[Tensor] = []
    if detections is not None:
        flat = [detections.boxes, detections.labels, detections.scores, detections.detection_x, detections.detection_y]
        for name, tensor in zip(("boxes", "labels", "scores", "detection_x", "detection_y"), flat):
            if not isinstance(tensor, Tensor):
                raise InvalidArgumentError(f"detections.{name} must be a tensor, got {type(tensor).__name__}")
            _check_device(f"detections.{name}", tensor)
            if tensor.dtype.is_complex or tensor.dtype == torch.bool:
                raise InvalidArgumentError(f"detections.{name} must hold real numbers, got {tensor.dtype}")
        if detections.labels.dtype.is_floating_point:
            raise InvalidArgumentError(f"detections.labels must be integers, got {detections.labels.dtype}")
        for name in ("score_ceiling", "epsilon"):
            if finite_float32(getattr(detections, name)) is None:
                raise InvalidArgumentError(f"detections.{name} must be a finite float32 number, got "
                                           f"{getattr(detections, name)!r}")
    score_ceiling, epsilon = (1.0, 0.0) if detections is None else (detections.score_ceiling, detections.epsilon)
    return _mean_field(
        unary, image,
        theta_xys, theta_colors, weights, compat,
        check_normalization(normalization), check_iterations(iterations), check_threads(threads),
        flat, float(score_ceiling), float(epsilon),
    )


def dense_crf_native(
    unary: Tensor,
    image: Tensor | None,
    *,
    iterations: int = 5,
    spatial: tuple[float, float] | None = (3.0, 3.0),
    bilateral: tuple[float, float, float] | None = (80.0, 13.0, 10.0),
    normalization: str = "after",
    threads: int | None = None,
) -> Tensor:
    """`dynseg.sdk.dense_crf` for tensors, differentiable: unary (L, H, W) float32 logits, image
    (H, W, 3) uint8 RGB (or None without a bilateral kernel); returns Q, (L, H, W)."""
    if not isinstance(unary, Tensor) or unary.dim() != 3:
        raise InvalidArgumentError(f"unary must be an (L, H, W) tensor, got {getattr(unary, 'shape', type(unary))}")
    kernels = gaussian_kernels(spatial, bilateral, has_image=image is not None)
    planar = None
    if image is not None:  # checked even when unused, as dense_crf checks it: a wrong image is a caller's bug
        if not isinstance(image, Tensor) or image.dtype != torch.uint8:
            got = image.dtype if isinstance(image, Tensor) else type(image).__name__
            raise InvalidArgumentError(f"image must be a uint8 RGB tensor, got {got}")
        check_image_shape(tuple(image.shape), *unary.shape[1:])
        if bilateral is not None:
            planar = image.permute(2, 0, 1).to(torch.float32).contiguous()
    logits = mean_field_native(unary, planar, kernels, normalization=normalization, iterations=iterations,
                               threads=threads)
    return torch.softmax(logits, dim=0)
