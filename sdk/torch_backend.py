"""The torch backend: a training checkpoint run by the trainer's network. It is the PyTorch reference
that `dynseg validate` compares an export against, and what training's held-out evaluation segments
with (`Segmenter.of_network`). The only backend that needs torch, imported when it is chosen."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import BackendError, DynsegError, InvalidArgumentError, LatticeRangeError, needs_trainer, one_line
from .graph import INPUTS, OUTPUTS, graph_inputs
from .inputs import cuda_index

if TYPE_CHECKING:  # the trainer needs torch, which this module imports only when the backend is chosen
    from dynseg.trainer.model import DynamicallyInstantiatedNetwork

TORCH_MAX_DETECTIONS = 10_000  # the network itself has no limit; this keeps a call's memory sane


def _check_checkpoint_folder(folder: Path) -> None:
    """Refuses a path that is no checkpoint folder before torch is imported: a wrong path (a quickstart's
    --out in place of its model.onnx, say) must not read as "install PyTorch" where torch is absent."""
    if not folder.exists():
        raise InvalidArgumentError(f"checkpoint {folder} does not exist")
    if not folder.is_dir():
        raise InvalidArgumentError(f"checkpoint {folder} is not a directory (model.json + model.safetensors)")
    if not (folder / "model.json").is_file():
        exports = sorted(folder.glob("*.onnx"))
        hint = f" (for the exported model give {exports[0]})" if exports else ""
        raise InvalidArgumentError(f"{folder} is not a dynseg checkpoint: model.json is missing{hint}")


class TorchBackend:
    """A checkpoint directory (model.json + model.safetensors) on the CPU or a CUDA device, or a network in
    memory (`of_network`)."""

    def __init__(self, path: str | Path, *, device: str = "cpu"):
        path = Path(path)
        _check_checkpoint_folder(path)
        try:
            import torch

            from dynseg.trainer.checkpoint import first_non_finite_weight, load_checkpoint
        except ImportError as error:
            raise InvalidArgumentError(needs_trainer("backend='torch'", error)) from None
        index = cuda_index(device)
        if index is not None and index >= torch.cuda.device_count():
            raise InvalidArgumentError(f"device {device!r}: this torch {torch.__version__} sees "
                                       f"{torch.cuda.device_count()} CUDA device(s)")
        try:
            network = load_checkpoint(path).to(device)
        except FileNotFoundError as error:
            raise InvalidArgumentError(str(error)) from None
        non_finite = first_non_finite_weight(network)
        if non_finite is not None:  # every image would fail in the CRFs, on what the network computed
            raise InvalidArgumentError(f"checkpoint {path}: its weights hold NaN or infinity (first in "
                                       f"{non_finite}): it cannot segment anything; did its training diverge?")
        self._serve(network, device)

    @classmethod
    def of_network(cls, network: DynamicallyInstantiatedNetwork) -> TorchBackend:
        """The backend of a DynamicallyInstantiatedNetwork in memory, on the device of its parameters (set to
        eval mode): what training's held-out evaluation runs, so that it scores as `dynseg eval` of the
        checkpoint it saves."""
        from dynseg.trainer.model import DynamicallyInstantiatedNetwork

        if not isinstance(network, DynamicallyInstantiatedNetwork):
            raise InvalidArgumentError(f"network must be a dynseg.trainer DynamicallyInstantiatedNetwork, got "
                                       f"{type(network).__name__}")
        backend = cls.__new__(cls)
        backend._serve(network, str(next(network.parameters()).device))
        return backend

    def _serve(self, network: DynamicallyInstantiatedNetwork, device: str) -> None:
        import torch

        from dynseg.trainer.checkpoint import weights_fingerprint

        self._model = network.eval()
        self._torch = torch
        self._device = device
        self.class_names: tuple[str, ...] = tuple(network.config.class_names)
        self.max_detections = TORCH_MAX_DETECTIONS
        self.weights_fingerprint: str | None = weights_fingerprint(network)
        self.score_ceiling = network.config.score_ceiling

    def run(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, *,
            timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        """`segmenter.NetworkBackend.run`; the graph runs as one, so `timings` gains nothing."""
        if self._model.training:  # of_network's network, put back to training by its owner
            raise InvalidArgumentError("the network is in training mode (network.train() was called after "
                                       "Segmenter.of_network): call network.eval() before segmenting, as batch "
                                       "normalisation would otherwise use this image's statistics")
        inputs = graph_inputs(image, boxes, labels, scores)
        inputs["image"] = inputs["image"][0]  # one (3, H, W) uint8 image: the network casts it, on its device
        try:
            with self._torch.no_grad():
                output = self._model(*(self._torch.as_tensor(inputs[name], device=self._device) for name in INPUTS))
        except LatticeRangeError as error:  # the image's size or colours, not what the network computed
            raise LatticeRangeError(f"the model cannot take this image: {error}") from error
        except InvalidArgumentError as error:  # the inputs were checked: what the CRFs refuse, the network made
            # (a checkpoint's weights were found finite at load: an of_network network may have diverged since)
            finite = all(bool(self._torch.isfinite(p).all()) for p in self._model.parameters())
            cause = "" if finite else " (the model's weights hold NaN or infinity)"
            raise InvalidArgumentError(f"the model refused what its network computed from this image and its "
                                       f"detections: {error}{cause}") from error
        except DynsegError:
            raise
        except RuntimeError as error:  # torch's: out of memory, most likely (torch.OutOfMemoryError is one)
            raise BackendError(f"PyTorch could not run the network on a {image.shape[0]}x{image.shape[1]} image "
                               f"with {len(boxes)} detections on {self._device}: {one_line(error)}") from error
        return {name: getattr(output, name).cpu().numpy() for name in OUTPUTS}
