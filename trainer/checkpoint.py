"""Checkpoints: a trained network on disk as model.json (its ModelConfig) and model.safetensors (its
weights), plus trainer_state.pt for resuming and training_data.json, what it was trained on (so that
`dynseg eval` holds out other scenes); and the fingerprint of a network's weights that an export
records, so that `dynseg validate` can tell the checkpoint a model came from. Imports only the model,
so that loading a checkpoint for inference pulls in no dataset, loss or evaluation code. A diverged
training's checkpoint loads (to be looked at); `first_non_finite_weight` names what diverged, for the
exporter and the Segmenter, which refuse it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from dynseg.sdk.commands.defaults import MAX_IMAGE_SIDE, MAX_SEED, MIN_IMAGE_SIDE
from dynseg.sdk.errors import InvalidArgumentError, one_line
from dynseg.sdk.files import check_regular_file, named_path, partial_path, writing
from dynseg.sdk.checks import is_int

from .model import DynamicallyInstantiatedNetwork, ModelConfig, build_model

__all__ = ["first_non_finite_weight", "load_checkpoint", "read_training_data", "save_checkpoint",
           "weights_fingerprint", "write_training_data"]

TRAINING_DATA = "training_data.json"


def save_checkpoint(directory: str | Path, model: DynamicallyInstantiatedNetwork,
                    optimiser: torch.optim.Optimizer | None = None, step: int = 0, *, stage: str | None = None,
                    settings: Mapping[str, Any] | None = None) -> Path:
    """Writes model.safetensors, model.json and, given an optimiser, trainer_state.pt into `directory`:
    the optimiser's state, the step, the training stage that saved it (`stage`), the weights'
    fingerprint, by which resuming refuses a state that is not the weights' own, and the stage's
    `settings` (its TrainConfig but steps, its image count, process count and detections' fingerprint),
    by which resuming refuses a run given other options.

    Each file is written beside its place, and only when all are complete are they moved there, one
    after the other, trainer_state.pt last: an interrupted save leaves the previous checkpoint, or, if
    cut in the instant between two moves, one whose trainer state resuming refuses (its weights
    fingerprint is not model.safetensors'). Raises OSError naming the file that could not be written (a
    full disk, a folder in its place)."""
    if not isinstance(model, DynamicallyInstantiatedNetwork):  # before the folder is made
        raise InvalidArgumentError(f"model must be a DynamicallyInstantiatedNetwork, got {type(model).__name__}")
    directory = named_path(directory, "directory")
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors' save_file creates its file readable by its owner alone; bytes written as any file is
    # written take the umask's permissions, so that a service running as another user can read the weights
    writes = [("model.safetensors", lambda path: path.write_bytes(save(
                  {k: v.detach().contiguous() for k, v in model.state_dict().items()}))),
              ("model.json", lambda path: path.write_text(model.config.to_json()))]
    if optimiser is not None:
        state = {"optimiser": optimiser.state_dict(), "step": step, "stage": stage,
                 "weights_sha256": weights_fingerprint(model), "settings": dict(settings or {})}
        writes.append(("trainer_state.pt", lambda path: torch.save(state, path)))
    partials = {name: partial_path(directory / name) for name, _ in writes}
    try:
        for name, write in writes:
            _named(directory / name, lambda: write(partials[name]))
            _named(directory / name, lambda: _sync(partials[name]))  # on the disk before a move makes it the file
        for name, partial in partials.items():
            _named(directory / name, lambda: os.replace(partial, directory / name))
        _named(directory, lambda: _sync(directory))  # and the moves with it, as the logs before them
    finally:
        for partial in partials.values():
            partial.unlink(missing_ok=True)
    return directory


def _sync(path: Path) -> None:
    """fsync of a file or a folder (its entries): what a power cut then cannot undo."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _named(path: Path, write: Callable[[], object]) -> None:
    """Runs `write`, whose failure becomes an OSError naming `path`, the file it was writing."""
    try:
        with writing(path):  # the system's refusal, its errno kept
            write()
    except (SafetensorError, RuntimeError) as error:  # the same refusals, as safetensors and torch.save word them
        raise OSError(f"could not write {path}: {one_line(error)}") from error


def load_checkpoint(directory: str | Path) -> DynamicallyInstantiatedNetwork:
    """The network saved by save_checkpoint, rebuilt from its JSON config. Raises FileNotFoundError
    when a file is missing and InvalidArgumentError (one line) when one is not what it should be."""
    directory = Path(directory)
    for name in ("model.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a dynseg checkpoint: {name} is missing")
    try:
        config = ModelConfig.from_json((directory / "model.json").read_text())
        model = build_model(config)
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise InvalidArgumentError(f"{directory}/model.json is not a dynseg model config: {one_line(error)}") from None
    except (RuntimeError, MemoryError) as error:  # sizes torch cannot allocate, e.g. a corrupted template_size
        raise InvalidArgumentError(
            f"{directory}/model.json describes a network that cannot be built: {one_line(error)}") from None
    load_weights(model, directory / "model.safetensors",
                 f"its model.json ({config.backbone}, {len(config.class_names)} class names)")
    return model


def load_weights(model: torch.nn.Module, path: Path, model_name: str) -> None:
    """Loads the safetensors file at `path` into `model` (described as `model_name` in errors).
    InvalidArgumentError, in one line, for a file that cannot be read or tensors that do not fit."""
    try:
        weights = load_file(path)
    except MemoryError:  # the machine's, not the file's
        raise
    except Exception as error:  # safetensors' own SafetensorError, or an OSError
        raise InvalidArgumentError(f"{path} is not readable: {one_line(error)}") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    # load_state_dict would cast them silently: integer weights where the network has floats (or the
    # reverse) are another file's; another float precision (an fp16 copy) casts safely
    retyped = [k for k in expected
               if k in weights and weights[k].is_floating_point() != expected[k].is_floating_point()]
    if missing or unexpected or reshaped or retyped:  # torch's own message lists every key, hundreds of lines
        counts = [f"{len(keys)} {what} (first {keys[0]})" for what, keys in
                  (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped),
                   ("of another kind of dtype", retyped)) if keys]
        raise InvalidArgumentError(f"{path} does not fit {model_name}: tensors {', '.join(counts)}")
    model.load_state_dict(weights)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (hex) of the model's state dict: every tensor's name, dtype, shape and bytes, in name order.
    Equal for a network and the same network saved and loaded; different for any other weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{values.dtype}|{tuple(values.shape)}|".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def first_non_finite_weight(model: torch.nn.Module) -> str | None:
    """The name of the model's first floating-point state entry holding NaN or infinity (a diverged
    training's), if any."""
    return next((name for name, tensor in model.state_dict().items()
                 if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)


def training_data_record(*, dataset: str, seed: int, image_size: tuple[int, int] | None = None,
                         split: str | None = None) -> dict[str, Any]:
    """The record write_training_data writes for these keywords, as read_training_data reads it back."""
    record: dict[str, Any] = {"dataset": dataset, "seed": seed}
    if image_size is not None:
        record["image_size"] = list(image_size)
    if split is not None:
        record["split"] = split
    return record


def write_training_data(checkpoint: str | Path, *, dataset: str, seed: int, image_size: tuple[int, int] | None = None,
                        split: str | None = None) -> None:
    """Records in the checkpoint folder `checkpoint` what its network was trained on: the dataset's name,
    the seed of its data and simulated detections, the synthetic scenes' (height, width), and an on-disk
    dataset's split. `train.fit` writes it beside each stage's checkpoint (its `training_data`). Raises
    InvalidArgumentError for a record read_training_data would refuse."""
    record = training_data_record(dataset=dataset, seed=seed, image_size=image_size, split=split)
    check_training_data(record)
    (Path(checkpoint) / TRAINING_DATA).write_text(json.dumps(record))


def check_training_data(record: Mapping[str, Any]) -> None:
    """Raises InvalidArgumentError, naming `training_data`, unless `record` holds write_training_data's
    fields in range: `train.fit` checks its `training_data` before it trains."""
    if not isinstance(record, Mapping):
        raise InvalidArgumentError(f"training_data must be a mapping of write_training_data's fields, got "
                                   f"{type(record).__name__}")
    size = record.get("image_size")
    problem = _training_data_problem(dict(record, image_size=list(size)) if isinstance(size, tuple) else dict(record))
    if problem is not None:
        raise InvalidArgumentError(f"training_data: {problem}; {_TRAINING_DATA_FIELDS}")


def read_training_data(directory: str | Path) -> dict | None:
    """What write_training_data recorded in `directory`, or None where it recorded nothing. A malformed
    record raises InvalidArgumentError naming the file: evaluation takes its seed and scenes from it, and
    guessing them instead could score a network on its own training scenes."""
    path = Path(directory) / TRAINING_DATA
    if not path.exists():
        return None
    check_regular_file(path, "training record")  # a pipe would be read forever
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        problem = _training_data_problem(data)
    except (OSError, ValueError, RecursionError) as error:
        problem = repr(error)
    if problem is None:
        return data
    raise InvalidArgumentError(f"{path} is malformed ({problem}): it records what the checkpoint was trained on "
                               f"{_TRAINING_DATA_FIELDS}; fix it, or delete it and give the evaluation's options "
                               "yourself")


_TRAINING_DATA_FIELDS = (f'as {{"dataset": a dataset\'s name, "seed": 0..{MAX_SEED}, synthetic scenes\' "image_size": '
                         f'[height, width], each {MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE}, and an on-disk dataset\'s '
                         '"split"}')


def _training_data_problem(data: object) -> str | None:
    """What is wrong with a training-data record, or None."""
    from .data.sources import DATASETS  # here: loading a checkpoint pulls in no dataset code

    # the image size chooses synthetic scenes only: an on-disk dataset's record may leave it out
    if not isinstance(data, dict) or not {"dataset", "seed"} <= set(data):
        return f"got {data!r:.200}"
    unknown = sorted(map(str, set(data) - {"dataset", "seed", "image_size", "split"}))
    if unknown:
        return f"unknown fields {', '.join(unknown)}"
    if data["dataset"] == "synthetic" and "image_size" not in data:
        return "no image_size for synthetic scenes"
    seed, size, split = data["seed"], data.get("image_size"), data.get("split")
    if data["dataset"] not in DATASETS:
        return f"dataset {data['dataset']!r:.80}"
    if not is_int(seed, numpy=False) or not 0 <= seed <= MAX_SEED:
        return f"seed {seed!r:.80}"
    if "image_size" in data and not (isinstance(size, list) and len(size) == 2
            and all(is_int(n, numpy=False) and MIN_IMAGE_SIDE <= n <= MAX_IMAGE_SIDE for n in size)):
        return f"image_size {size!r:.80}"
    if split is not None and not isinstance(split, str):
        return f"split {split!r:.80}"
    return None
