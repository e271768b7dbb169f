"""The network on a GPU: the trainer's forward pass on CUDA tensors (both CRFs on the CUDA kernels)
agrees with the CPU's, a training step works there, and the torch backend of the SDK runs on it.
Skipped, saying why, without CUDA kernels or a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from dynseg.sdk import _native, samples

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(
    not (_native.cuda_compiled() and _native.cuda_device_count() and torch.cuda.is_available()),
    reason="needs the CUDA kernels, a GPU and a CUDA build of torch; CI machines have none: scripts/gpu_check.sh "
           "runs these on a lent GPU",
)


@pytest.fixture(scope="module")
def model():
    from dynseg.trainer.model.instance import InstanceConfig
    from dynseg.trainer.model.network import ModelConfig, build_model

    torch.manual_seed(0)
    network = build_model(ModelConfig(backbone="resnet18", class_names=("cat", "cup", "person"),
                                      instance=InstanceConfig(templates_per_group=4, template_size=16)))
    with torch.no_grad():
        network.instance_unaries.templates.uniform_(0.0, 1.0)
    return network.eval()


def _inputs(device: str):
    image = samples.load("chelsea")[:200, :300]
    boxes = torch.tensor([[20.0, 30.0, 180.0, 190.0], [100.0, 10.0, 290.0, 150.0], [5.0, 5.0, 60.0, 60.0]])
    return (torch.tensor(image.transpose(2, 0, 1).astype(np.float32), device=device), boxes.to(device),
            torch.tensor([1, 2, 3], device=device), torch.tensor([0.9, 0.6, 0.4], device=device))


def test_forward_on_cuda_matches_the_cpu(model):
    torch.backends.cudnn.allow_tf32 = False  # full float32 convolutions, comparable with the CPU's
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        cpu = model.cpu()(*_inputs("cpu"))
        gpu = model.cuda()(*_inputs("cuda"))
    model.cpu()
    q_cpu = torch.softmax(cpu.instance_logits, 0)
    q_gpu = torch.softmax(gpu.instance_logits, 0).cpu()
    # the CRFs amplify the convolutions' rounding differences (docs/ops.md, Numerics)
    assert (q_gpu - q_cpu).abs().max() <= 1e-3
    assert (q_gpu.argmax(0) == q_cpu.argmax(0)).float().mean() >= 0.999
    assert (gpu.semantic_probabilities.cpu() - cpu.semantic_probabilities).abs().max() <= 1e-3


def test_a_training_step_on_cuda_reaches_the_backbone(model):
    from dynseg.trainer.loss import instance_loss

    network = model.cuda().train()
    network.semantic.eval()  # the PSP head's batch norm needs more than one value per channel
    image, boxes, labels, scores = _inputs("cuda")
    output = network(image, boxes, labels, scores)
    gt_masks = torch.zeros(2, *image.shape[1:], dtype=torch.bool, device="cuda")
    gt_masks[0, 40:150, 30:170] = True
    gt_masks[1, 20:140, 120:280] = True
    loss = instance_loss(output.instance_logits, boxes, labels, scores, gt_masks, torch.tensor([1, 2], device="cuda"))
    loss.backward()
    grads = [p.grad for p in network.semantic.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert network.semantic.backbone.conv1.weight.grad.abs().sum() > 0  # through the CRFs to the first layer
    network.zero_grad()
    network.cpu().eval()


def test_the_torch_backend_runs_on_cuda(model, tmp_path):
    from dynseg.sdk.segmenter import Segmenter
    from dynseg.trainer.checkpoint import save_checkpoint

    save_checkpoint(tmp_path, model.cpu())
    image, boxes, labels, scores = (t.cpu().numpy() for t in _inputs("cpu"))
    image = samples.load("chelsea")[:200, :300]
    on_gpu = Segmenter(tmp_path, backend="torch", device="cuda").segment(image, boxes, labels, scores)
    on_cpu = Segmenter(tmp_path, backend="torch", device="cpu").segment(image, boxes, labels, scores)
    assert [i.detection for i in on_gpu.instances] == [i.detection for i in on_cpu.instances]
    assert (on_gpu.instance_map == on_cpu.instance_map).mean() >= 0.999
