"""The native CRF kernels as a torch op with autograd: what training runs on.

`torch.ops.dynseg.mean_field` wraps the kernel library's forward and backward
(plugins/include/dynseg_crf.h) through `dynseg.sdk._native`, on the CPU for CPU tensors and on the
GPU (the CUDA entry points, on torch's current stream, no copies) for CUDA tensors. Its torch-level
front ends: `dense_crf_native` takes `dense_crf_reference`'s parameters (plus `threads`);
`mean_field_native` takes the thetas and the image and builds its lattices itself, where
`meanfield.mean_field_reference` (the readable definition the kernels are tested against) takes
lattices already built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from dynseg.sdk import _native
from dynseg.sdk.crf import check_iterations, check_normalization, check_threads, gaussian_kernels
from dynseg.sdk.errors import InvalidArgumentError
from dynseg.sdk.checks import finite_float32, positive_in_float32

__all__ = ["GaussianKernel", "crf_kernels", "mean_field_native", "dense_crf_native"]

# (theta_xy, theta_color, weight): theta_color = 0 for a spatial kernel; weight a float, a 0-d tensor
# (label-agnostic) or an (L, L) tensor.
GaussianKernel = tuple[float, float, Union[float, Tensor]]


def crf_kernels(*, theta_spatial: float, theta_bilateral_xy: float, theta_bilateral_rgb: float,
                spatial_weight: float | Tensor, bilateral_weight: float | Tensor) -> list[GaussianKernel]:
    """The two kernels of each of the network's CRFs, spatial then bilateral (the paper's θγ, θα, θβ)."""
    return [(theta_spatial, 0.0, spatial_weight), (theta_bilateral_xy, theta_bilateral_rgb, bilateral_weight)]


def _numpy(tensor: Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())


def _device_array(tensor: Tensor) -> _native.DeviceArray:
    return _native.DeviceArray.of(tensor, "a CRF tensor")


def _problem(
    unary: Tensor, image: Tensor | None, theta_xy: list[float], theta_color: list[float], weights: list[Tensor],
    compat: Tensor | None, normalization: str, iterations: int, threads: int,
    array: Callable[[Tensor], np.ndarray | _native.DeviceArray] = _numpy,
) -> _native.Problem:
    """The op's native problem, logits out; `array` hands the library each tensor (`_numpy` for a CPU
    call, `_device_array` for a CUDA call, whose tensors must then be float32, contiguous and on the device)."""
    # The registered op is public (torch.ops.dynseg.mean_field): its arguments are checked here too.
    if unary.dim() != 3:
        raise InvalidArgumentError(f"unary must be (L, H, W), got {tuple(unary.shape)}")
    if not len(theta_xy) == len(theta_color) == len(weights):
        raise InvalidArgumentError(f"theta_xy, theta_color and weights must have one entry per kernel, got "
                                   f"{len(theta_xy)}, {len(theta_color)} and {len(weights)}")
    num_labels, height, width = unary.shape
    kernels = [
        _native.Kernel(t, c, array(w.reshape(1) if w.numel() == 1 else w))
        for t, c, w in zip(theta_xy, theta_color, weights)
    ]
    return _native.Problem(
        num_labels, height, width, None if image is None else array(image), kernels,
        compat=None if compat is None else array(compat), normalization=normalization, iterations=iterations,
        output=_native.Output.LOGITS, threads=threads,
    )


class _CudaCall:
    """One CUDA call's problem over device tensors (kept alive here), its workspace and stream."""

    def __init__(self, unary: Tensor, image: Tensor | None, theta_xy: list[float], theta_color: list[float],
                 weights: Sequence[Tensor], compat: Tensor | None, normalization: str, iterations: int,
                 pass_: _native.Pass) -> None:
        device = unary.device

        def on_device(tensor: Tensor) -> Tensor:
            return tensor.detach().to(device, torch.float32).contiguous()

        self.unary = on_device(unary)
        device_image = None if image is None else on_device(image)
        device_compat = None if compat is None else on_device(compat)
        device_weights = [on_device(w) for w in weights]
        self.tensors = [self.unary, device_image, device_compat, *device_weights]  # the problem points into them
        self.problem = _problem(self.unary, device_image, theta_xy, theta_color, device_weights, device_compat,
                                normalization, iterations, 0, array=_device_array)
        self.nbytes = self.problem.workspace_size_cuda(pass_)
        self.workspace = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        self.stream = torch.cuda.current_stream(device).cuda_stream


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
) -> Tensor:
    if unary.is_cuda:
        with torch.cuda.device(unary.device):
            call = _CudaCall(unary, image, theta_xy, theta_color, weights, compat, normalization, iterations,
                             _native.Pass.FORWARD)
            logits = torch.empty_like(call.unary)
            call.problem.forward_cuda(_device_array(call.unary), _device_array(logits), call.workspace.data_ptr(),
                                      call.nbytes, call.stream)
    else:
        problem = _problem(unary, image, theta_xy, theta_color, weights, compat, normalization, iterations, threads)
        logits = torch.from_numpy(problem.forward(_numpy(unary)))
    return logits.to(unary.dtype)


@_mean_field.register_fake
def _(unary, image, theta_xy, theta_color, weights, compat, normalization, iterations, threads):
    return torch.empty_like(unary)


# The backward is an op of its own, so that torch.compile traces it as one opaque call (with the fake
# below for shapes) rather than into the numpy and ctypes calls that run the kernels.
@torch.library.custom_op("dynseg::mean_field_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _mean_field_backward(
    grad_logits: Tensor,
    unary: Tensor,
    image: Optional[Tensor],
    theta_xy: list[float],
    theta_color: list[float],
    weights: list[Tensor],
    compat: Optional[Tensor],
    normalization: str,
    iterations: int,
    threads: int,
    want_weights: list[bool],
    want_compat: bool,
) -> list[Tensor]:
    """[grad_unary, grad_compat, *grad_weights]; a gradient not wanted is an empty tensor (an op returns
    no None)."""
    if unary.is_cuda:
        grad_unary, grad_weights, grad_compat = _backward_cuda(
            grad_logits, unary, image, theta_xy, theta_color, weights, compat, normalization, iterations,
            want_weights, want_compat)
    else:
        problem = _problem(unary, image, theta_xy, theta_color, weights, compat, normalization, iterations, threads)
        arrays = problem.backward(_numpy(unary), _numpy(grad_logits), want_weights, want_compat)
        as_tensor = lambda array: None if array is None else torch.from_numpy(array)
        grad_unary = torch.from_numpy(arrays[0])
        grad_weights, grad_compat = [as_tensor(g) for g in arrays[1]], as_tensor(arrays[2])
    grads = [grad_unary, grad_compat, *grad_weights]
    return [unary.new_empty(0) if g is None or like is None else g.reshape(like.shape).to(like.device, like.dtype)
            for g, like in zip(grads, (unary, compat, *weights))]


@_mean_field_backward.register_fake
def _(grad_logits, unary, image, theta_xy, theta_color, weights, compat, normalization, iterations, threads,
      want_weights, want_compat):
    gradient = lambda like, wanted: torch.empty_like(like) if wanted else unary.new_empty(0)
    return [torch.empty_like(unary), gradient(compat, want_compat and compat is not None),
            *[gradient(w, wanted) for w, wanted in zip(weights, want_weights)]]


def _backward_cuda(
    grad_logits: Tensor, unary: Tensor, image: Tensor | None, theta_xy: list[float], theta_color: list[float],
    weights: list[Tensor], compat: Tensor | None, normalization: str, iterations: int, want_weights: list[bool],
    want_compat: bool,
) -> tuple[Tensor, list[Tensor | None], Tensor | None]:
    with torch.cuda.device(unary.device):
        call = _CudaCall(unary, image, theta_xy, theta_color, weights, compat, normalization, iterations,
                         _native.Pass.BACKWARD)
        grad = grad_logits.detach().to(unary.device, torch.float32).contiguous()
        grad_unary = torch.empty_like(call.unary)
        grad_weights = [torch.empty(w.shape, dtype=torch.float32, device=unary.device) if wanted else None
                        for w, wanted in zip(weights, want_weights)]
        grad_compat = (torch.empty(compat.shape, dtype=torch.float32, device=unary.device)
                       if compat is not None and want_compat else None)
        call.problem.backward_cuda(
            _device_array(call.unary), _device_array(grad), _device_array(grad_unary),
            [None if g is None else _device_array(g.reshape(-1) if g.numel() == 1 else g) for g in grad_weights],
            None if grad_compat is None else _device_array(grad_compat),
            call.workspace.data_ptr(), call.nbytes, call.stream,
        )
    return grad_unary, grad_weights, grad_compat


def _setup_context(ctx, inputs, output):
    ctx.inputs = inputs
    unary, image, _, _, weights, compat, *_ = inputs
    ctx.save_for_backward(unary, image, compat, *weights)


def _backward(ctx, grad_logits):
    if torch.is_grad_enabled():  # on in a backward only under create_graph=True
        raise NotImplementedError("dynseg::mean_field has no double backward: its gradient is computed by the "
                                  "native library, outside autograd (use mean_field_reference for it)")
    unary, image, compat, *weights = ctx.saved_tensors
    _, _, theta_xy, theta_color, _, _, normalization, iterations, threads = ctx.inputs
    # a list input's entry of needs_input_grad is a list: one flag per weight
    want_weights = [bool(wanted) for wanted in ctx.needs_input_grad[4]]
    want_compat = compat is not None and bool(ctx.needs_input_grad[5])
    grad_unary, grad_compat, *grad_weights = _mean_field_backward(
        grad_logits, unary, image, theta_xy, theta_color, weights, compat, normalization, iterations, threads,
        want_weights, want_compat)
    thetas: list | None = [] if not theta_xy else None  # torch reads an empty list as one of tensors: []
    return (
        grad_unary,
        None, thetas, thetas,
        [g if wanted else None for g, wanted in zip(grad_weights, want_weights)],
        grad_compat if want_compat else None,
        None, None, None,
    )


_mean_field.register_autograd(_backward, setup_context=_setup_context)


def _check_device(name: str, tensor: object) -> None:
    """Refuses a tensor on a device the kernels cannot read (a meta tensor would send the op to its
    fake kernel, whose result is uninitialised memory)."""
    if isinstance(tensor, Tensor) and tensor.device.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"{name} must be a CPU or CUDA tensor, got one on {tensor.device}")


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
    logits = _mean_field(
        unary, image,
        theta_xys, theta_colors, weights, compat,
        check_normalization(normalization), check_iterations(iterations), check_threads(threads),
    )
    return logits


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
        if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3:
            got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, Tensor) else type(image).__name__
            raise InvalidArgumentError(f"image must be an (H, W, 3) uint8 tensor, got {got}")
        if tuple(image.shape[:2]) != tuple(unary.shape[1:]):
            raise InvalidArgumentError(f"image size {tuple(image.shape[:2])} does not match unary's "
                                       f"{tuple(unary.shape[1:])}")
        if bilateral is not None:
            planar = image.permute(2, 0, 1).to(torch.float32).contiguous()
    logits = mean_field_native(unary, planar, kernels, normalization=normalization, iterations=iterations,
                               threads=threads)
    return torch.softmax(logits, dim=0)
