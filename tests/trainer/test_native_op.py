"""The torch op on the native kernels (dynseg::mean_field): same values and gradients as the
PyTorch reference, usable for training, and strict about its inputs."""

from __future__ import annotations

import pytest
import torch

from dynseg.sdk import InvalidArgumentError
from dynseg.trainer.crf import (
    PermutohedralLattice, dense_crf_native, dense_crf_reference, gaussian_features, mean_field_native,
    mean_field_reference,
)

L, H, W = 4, 14, 11


@pytest.fixture
def scene():
    generator = torch.Generator().manual_seed(3)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    image = torch.stack([128 + 90 * torch.sin(xs / 4 + c) * torch.cos(ys / 5 - c) for c in range(3)], dim=-1)
    image = image.round().clamp(0, 255).to(torch.uint8)
    unary = torch.randn(L, H, W, generator=generator)
    return unary, image


def reference_kernels(image, weights):
    spatial = PermutohedralLattice(gaussian_features(None, H, W, 3.0, None))
    bilateral = PermutohedralLattice(gaussian_features(image, H, W, 9.0, 13.0))
    return [(spatial, weights[0]), (bilateral, weights[1])]


def native_kernels(weights):
    return [(3.0, 0.0, weights[0]), (9.0, 13.0, weights[1])]


def asymmetric(diagonal: float, seed: int) -> torch.Tensor:
    """diagonal x I plus small uniform entries: (L, L), not its own transpose, so a transposed read shows."""
    return torch.eye(L) * diagonal + 0.2 * torch.rand(L, L, generator=torch.Generator().manual_seed(seed))


PARAMETERS = {
    "scalar weights, Potts": (lambda: (torch.tensor(3.0), torch.tensor(4.0)), lambda: None),
    "matrix weights, Potts": (lambda: (asymmetric(3.0, 1), asymmetric(4.0, 2)), lambda: None),
    "scalar and matrix weights, diagonal compat": (lambda: (torch.tensor(3.0), asymmetric(4.0, 3)),
                                                   lambda: -torch.ones(L) * 0.7),
    "matrix weights, full compat": (lambda: (asymmetric(3.0, 4), asymmetric(4.0, 5)), lambda: asymmetric(-1.0, 6)),
}


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
@pytest.mark.parametrize("case", PARAMETERS)
def test_native_op_has_the_references_values_and_gradients(scene, case, normalization):
    unary, image = scene
    make_weights, make_compat = PARAMETERS[case]
    weights = [w.requires_grad_() for w in make_weights()]
    compat = make_compat()
    if compat is not None:
        compat.requires_grad_()
    unary = unary.clone().requires_grad_()
    planar = image.permute(2, 0, 1).float().contiguous()
    wanted = [unary, *weights] + ([compat] if compat is not None else [])

    native = mean_field_native(unary, planar, native_kernels(weights), compat=compat,
                               normalization=normalization, iterations=3)
    reference = mean_field_reference(unary, reference_kernels(image, weights), compat=compat,
                                     normalization=normalization, iterations=3)
    assert torch.allclose(native, reference, atol=1e-5, rtol=0)

    upstream = torch.randn(native.shape, generator=torch.Generator().manual_seed(9))
    native_grads = torch.autograd.grad((native * upstream).sum(), wanted)
    reference_grads = torch.autograd.grad((reference * upstream).sum(), wanted)
    for got, expected in zip(native_grads, reference_grads):
        scale = expected.abs().max().item()
        assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, scale)


def test_training_through_the_native_op_lowers_the_loss(scene):
    unary, image = scene
    target = unary.argmax(dim=0)
    weights = [torch.tensor(0.0, requires_grad=True), torch.tensor(0.0, requires_grad=True)]
    planar = image.permute(2, 0, 1).float().contiguous()
    noisy = unary + torch.randn(unary.shape, generator=torch.Generator().manual_seed(1)) * 2
    optimiser = torch.optim.SGD(weights, lr=0.5)
    losses = []
    for _ in range(10):
        logits = mean_field_native(noisy, planar, native_kernels(weights), iterations=3)
        loss = torch.nn.functional.cross_entropy(logits.reshape(L, -1).t(), target.reshape(-1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_dense_crf_native_matches_the_reference_dense_crf(scene):
    unary, image = scene
    native = dense_crf_native(unary, image, bilateral=(9.0, 13.0, 5.0), iterations=4, normalization="symmetric")
    reference = dense_crf_reference(unary, image, bilateral=(9.0, 13.0, 5.0), iterations=4, normalization="symmetric")
    assert torch.allclose(native, reference, atol=1e-5, rtol=0)


def test_native_op_rejects_wrong_weight_shapes_and_devices(scene):
    unary, image = scene
    planar = image.permute(2, 0, 1).float().contiguous()
    with pytest.raises(InvalidArgumentError, match="weight"):
        mean_field_native(unary, planar, [(3.0, 0.0, torch.ones(2, 2))])
    with pytest.raises(InvalidArgumentError, match="compat"):
        mean_field_native(unary, planar, [(3.0, 0.0, 1.0)], compat=torch.ones(L + 1))
    with pytest.raises(InvalidArgumentError, match="float32"):
        mean_field_native(unary.double(), planar, [(3.0, 0.0, 1.0)])
    with pytest.raises(InvalidArgumentError, match="theta_xy"):
        mean_field_native(unary, planar, [(0.0, 0.0, 1.0)])


def test_native_op_refuses_an_image_of_another_size_before_the_library_reads_it(scene):
    unary, image = scene
    planar = image.permute(2, 0, 1).float().contiguous()
    for wrong in (planar[:, : H // 2], planar[:, :, 1:], planar[0]):  # the library would read past its end
        with pytest.raises(InvalidArgumentError, match=rf"image must be \(C, {H}, {W}\)"):
            mean_field_native(unary, wrong.contiguous(), native_kernels((3.0, 4.0)))


def test_native_op_refuses_a_double_backward_rather_than_drop_its_second_order_terms(scene):
    unary, image = scene
    unary = unary.clone().requires_grad_(True)
    planar = image.permute(2, 0, 1).float().contiguous()
    logits = mean_field_native(unary, planar, native_kernels((3.0, 4.0)), iterations=2)
    (gradient,) = torch.autograd.grad(logits[1].sum(), unary)  # a first-order gradient is fine
    assert torch.isfinite(gradient).all()
    logits = mean_field_native(unary, planar, native_kernels((3.0, 4.0)), iterations=2)
    with pytest.raises(NotImplementedError, match="no double backward"):
        torch.autograd.grad(logits[1].sum(), unary, create_graph=True)


@pytest.mark.parametrize("kernels, compat, message", [
    ([(3.0, 1.0)], None, r"kernels\[0\] must be \(theta_xy, theta_color, weight\)"),
    (None, None, "kernels must be a sequence"),
    ([(True, 0.0, 1.0)], None, r"kernels\[0\].theta_xy must be a finite float32 number > 0, got True"),
    ([(3.0, "13", 1.0)], None, r"kernels\[0\].theta_color must be a finite float32 number >= 0, got '13'"),
    ([(10**400, 0.0, 1.0)], None, r"kernels\[0\].theta_xy must be a finite float32 number > 0"),  # beyond float64
    ([(1e39, 0.0, 1.0)], None, r"kernels\[0\].theta_xy must be a finite float32 number > 0, got 1e\+39"),
    ([(1e-46, 0.0, 1.0)], None, r"kernels\[0\].theta_xy must be a finite float32 number > 0, got 1e-46"),
    ([(3.0, -1.0, 1.0)], None, r"kernels\[0\].theta_color must be a finite float32 number >= 0, got -1.0"),
    ([(3.0, 0.0, True)], None, r"kernels\[0\] weight must be a finite float32 number or a real tensor"),
    ([(3.0, 0.0, 10**400)], None, r"kernels\[0\] weight must be a finite float32 number or a real tensor"),
    ([(3.0, 0.0, 1e39)], None, r"kernels\[0\] weight must be a finite float32 number or a real tensor, got 1e\+39"),
    ([(3.0, 0.0, torch.tensor(3 + 1j))], None, r"kernels\[0\] weight must be a finite float32 number or a real"),
    ([(3.0, 0.0, torch.tensor(True))], None, r"kernels\[0\] weight must be a finite float32 number or a real"),
    ([(3.0, 0.0, torch.ones((), device="meta"))], None, r"kernels\[0\] weight must be a CPU or CUDA tensor"),
    ([(3.0, 0.0, 1.0)], [1.0] * L, "compat must be None or a"),
    ([(3.0, 0.0, 1.0)], torch.ones(L + 1, device="meta"), "compat must be a CPU or CUDA tensor"),
])
def test_native_op_names_a_malformed_kernel_or_compat(scene, kernels, compat, message):
    unary, _ = scene
    with pytest.raises(InvalidArgumentError, match=message):
        mean_field_native(unary, None, kernels, compat=compat)


@pytest.mark.parametrize("image, compat, message", [
    ("bool", None, "image must hold real numbers, got torch.bool"),
    (None, torch.tensor([1 + 5j, 1, 1, 1]), "compat must hold real numbers, got torch.complex64"),
])
def test_native_op_refuses_a_bool_image_or_a_complex_compat_rather_than_convert_it(scene, image, compat, message):
    unary, rgb = scene
    planes = rgb.permute(2, 0, 1) > 100 if image == "bool" else None
    with pytest.raises(InvalidArgumentError, match=message):
        mean_field_native(unary[:4], planes, [(3.0, 0.0, 1.0), (80.0, 13.0, 1.0)], compat=compat)


def test_the_registered_ops_check_what_their_front_end_would(scene):
    # torch.ops.dynseg.* are callable directly: lists of other lengths are refused, not zipped short
    unary, image = scene
    planar = image.permute(2, 0, 1).float().contiguous()
    thetas, one_weight = ([3.0, 80.0], [0.0, 13.0]), [torch.tensor(3.0)]
    forward, backward = torch.ops.dynseg.mean_field, torch.ops.dynseg.mean_field_backward
    none = ([], 1.0, 0.0)  # no detections, and the potential's constants
    with pytest.raises(InvalidArgumentError, match="theta_xy, theta_color and weights must have one entry per "
                                                   "kernel, got 2, 2 and 1"):
        forward(unary, planar, *thetas, one_weight, None, "after", 2, 0, *none)
    with pytest.raises(InvalidArgumentError, match=r"want_weights must have one entry per kernel \(2\), got 1"):
        backward(torch.ones_like(unary), unary.new_empty(0), unary, planar, *thetas, one_weight * 2, None, "after", 2,
                 0, *none, [True], False, False)
    with pytest.raises(InvalidArgumentError, match="normalization must be 'after' or 'symmetric', got 'before'"):
        forward(unary, planar, *thetas, one_weight * 2, None, "before", 2, 0, *none)
    with pytest.raises(InvalidArgumentError, match=r"unary must be \(L, H, W\), got \(14, 11\)"):
        forward(unary[0], planar, *thetas, one_weight * 2, None, "after", 2, 0, *none)
    with pytest.raises(InvalidArgumentError, match=r"kernels\[0\] weight must be a scalar or \(4, 4\), got \(16,\)"):
        forward(unary, planar, *thetas, [torch.ones(L * L), torch.tensor(1.0)], None, "after", 2, 0, *none)
    with pytest.raises(InvalidArgumentError, match=r"detections must be \[\] or \[boxes, labels, scores, "
                                                   r"detection_x, detection_y\], got 2 tensors"):
        forward(unary, planar, *thetas, one_weight * 2, None, "after", 2, 0, [torch.zeros(1, 4), torch.ones(1)],
                1.0, 0.0)
    box = torch.tensor([[1.0, 1.0, 5.0, 5.0]])
    for labels in (torch.tensor([1.7]), torch.tensor([True])):  # 1.7 was read as label 1, silently
        with pytest.raises(InvalidArgumentError, match=f"detections' labels must be integers, got {labels.dtype}"):
            forward(unary, planar, *thetas, one_weight * 2, None, "after", 2, 0,
                    [box, labels, torch.tensor([0.9]), torch.tensor(1.0), torch.tensor(1.0)], 1.0, 0.0)


def test_the_backward_runs_at_the_largest_label_count():
    # one pixel, L = 65536, Potts: only the diagonal of the L x L parameter sums is read and kept (32 GiB
    # in full: the allocation failed); tests/plugins checks the workspace's size
    def gradients(native: bool) -> tuple[torch.Tensor, torch.Tensor]:
        unary = torch.linspace(-1, 1, 65536).reshape(-1, 1, 1).requires_grad_()
        weight = torch.tensor(2.0, requires_grad=True)
        if native:
            logits = mean_field_native(unary, None, [(3.0, 0.0, weight)], iterations=2)
        else:
            lattice = PermutohedralLattice(gaussian_features(None, 1, 1, 3.0, None))
            logits = mean_field_reference(unary, [(lattice, weight)], iterations=2)
        logits[::7].sum().backward()
        return unary.grad, weight.grad

    (native_unary, native_weight), (reference_unary, reference_weight) = gradients(True), gradients(False)
    assert float(reference_weight.abs()) > 1e-3
    torch.testing.assert_close(native_unary, reference_unary, rtol=0, atol=1e-6)
    torch.testing.assert_close(native_weight, reference_weight, rtol=1e-4, atol=1e-6)


def test_native_op_names_an_empty_unary(scene):
    unary, _ = scene
    for empty in (unary[:0], unary[:, :0], unary[:, :, :0]):
        with pytest.raises(InvalidArgumentError, match=r"unary must have L, H, W >= 1"):
            mean_field_native(empty, None, [(3.0, 0.0, 1.0)])


def test_native_op_refuses_a_meta_image_rather_than_return_its_fake_kernels_empty_tensor(scene):
    unary, _ = scene
    with pytest.raises(InvalidArgumentError, match="image must be a CPU or CUDA tensor"):
        mean_field_native(unary, torch.zeros(3, H, W, device="meta"), [(3.0, 13.0, 1.0)])


def test_logits_and_gradients_that_overflow_float32_are_refused_not_returned_as_nan(scene):
    unary, image = scene
    huge = [(3.0, 0.0, 3e38), (80.0, 13.0, 3e38)]
    planar = image.permute(2, 0, 1).float().contiguous()
    with pytest.raises(InvalidArgumentError, match="the logits overflowed float32"):
        mean_field_native(unary * 1e37, planar, huge)
    with pytest.raises(InvalidArgumentError, match="the logits overflowed float32"):
        dense_crf_native(unary * 1e37, image, spatial=(3.0, 3e38), bilateral=(80.0, 13.0, 3e38))
    with pytest.raises(InvalidArgumentError, match="the logits overflowed float32"):
        dense_crf_reference(unary * 1e37, image, spatial=(3.0, 3e38), bilateral=(80.0, 13.0, 3e38))
    leaf = unary.clone().requires_grad_(True)
    logits = mean_field_native(leaf, None, [(3.0, 0.0, 3.0)])
    with pytest.raises(InvalidArgumentError, match="the gradients overflowed float32"):
        logits.backward(torch.full_like(logits, 3e38))


def test_dense_crf_native_names_a_unary_of_the_wrong_rank(scene):
    _, image = scene
    with pytest.raises(InvalidArgumentError, match=r"unary must be an \(L, H, W\) tensor"):
        dense_crf_native(torch.randn(H, W), image)


@pytest.mark.parametrize("bilateral", [(80.0, 13.0, 10.0), None])
def test_dense_crf_native_checks_the_image_whether_or_not_a_bilateral_kernel_reads_it(scene, bilateral):
    unary, image = scene
    with pytest.raises(InvalidArgumentError, match="image must be a uint8 RGB tensor, got str"):
        dense_crf_native(unary, "garbage", bilateral=bilateral)
    with pytest.raises(InvalidArgumentError, match=rf"image must have shape \(H, W, 3\) = \({H}, {W}, 3\) to match"):
        dense_crf_native(unary, image[1:], bilateral=bilateral)
    assert torch.equal(dense_crf_native(unary, image, bilateral=None), dense_crf_native(unary, None, bilateral=None))


def test_native_op_takes_numpy_scalars_as_thetas_and_weights(scene):
    import numpy as np

    unary, _ = scene
    plain = mean_field_native(unary, None, [(3.0, 0.0, 2.0)], iterations=2)
    numpy = mean_field_native(unary, None, [(np.float32(3.0), 0, np.float32(2.0))], iterations=2)
    assert torch.equal(plain, numpy)


def _op_inputs(scene, compat):
    unary, image = scene
    planar = image.permute(2, 0, 1).float().contiguous()
    weights = [torch.tensor(3.0), torch.eye(L) * 4 + 0.1]
    return unary, planar, [3.0, 9.0], [0.0, 13.0], weights, compat


@pytest.mark.parametrize("kernels", [2, 0], ids=["two kernels", "no kernel"])
@pytest.mark.parametrize("compat", [None, -torch.eye(L) + 0.05], ids=["Potts", "full compat"])
def test_the_forward_and_backward_ops_pass_torchs_op_checks(scene, compat, kernels):
    # Schema, fake kernel against the real one, and the autograd registration, as torch.compile and
    # export rely on them.
    unary, planar, theta_xy, theta_color, weights, compat = _op_inputs(scene, compat)
    theta_xy, theta_color, weights = theta_xy[:kernels], theta_color[:kernels], weights[:kernels]
    unary = unary.clone().requires_grad_()
    weights = [w.clone().requires_grad_(index == 0) for index, w in enumerate(weights)]  # one without a gradient
    detections = [torch.tensor([[1.0, 2.0, 8.0, 9.0], [0.0, 0.0, 10.0, 13.0]]), torch.tensor([1, 3]),
                  torch.tensor([0.8, 0.4]), torch.tensor(1.2, requires_grad=True), torch.tensor(0.7)]
    for potential in ([], detections):
        forward = (unary, planar, theta_xy, theta_color, weights, compat, "after", 2, 1, potential, 1.0, 1e-4)
        torch.library.opcheck(torch.ops.dynseg.mean_field.default, forward)
        for want_weights, want_compat in (([True, False][:kernels], compat is not None), ([False] * kernels, False)):
            backward = (torch.randn(unary.shape), torch.randn(len(potential) and 2), unary.detach(), planar, theta_xy,
                        theta_color, [w.detach() for w in weights], compat, "symmetric", 2, 1,
                        [t.detach() for t in potential], 1.0, 1e-4, want_weights, want_compat, bool(potential))
            torch.library.opcheck(torch.ops.dynseg.mean_field_backward.default, backward)


def test_the_library_computes_only_the_weight_gradients_autograd_needs(scene, monkeypatch):
    from dynseg.sdk import _native

    asked = []
    backward = _native.Problem.backward
    monkeypatch.setattr(_native.Problem, "backward", lambda self, unary, grad, want_weights, want_compat: (
        asked.append(list(want_weights)) or backward(self, unary, grad, want_weights, want_compat)))
    unary, planar, _, _, (spatial, bilateral), _ = _op_inputs(scene, None)
    spatial.requires_grad_()
    logits = mean_field_native(unary, planar, native_kernels((spatial, bilateral)), iterations=2)
    logits.square().sum().backward()
    assert asked == [[True, False]]
    assert spatial.grad is not None and bilateral.grad is None


def test_torch_compile_gives_the_eager_values_and_gradients(scene):
    unary, planar, _, _, weights, _ = _op_inputs(scene, None)

    def loss(unary, spatial, bilateral, compat):
        logits = mean_field_native(unary, planar, native_kernels((spatial, bilateral)), compat=compat, iterations=3)
        return (logits * torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)).sum()

    results = []
    for function in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (unary, *weights, -torch.ones(L) * 0.7)]
        value = function(*leaves)
        value.backward()
        results.append([value.detach(), *(leaf.grad for leaf in leaves)])
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled)
