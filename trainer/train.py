"""Training (Sec. 3.4-3.5): stage 1 trains the semantic subnetwork with pixelwise cross-entropy on
its semantic CRF's output (CRF-as-RNN with the detection potential, so the CRF's kernel weights,
compatibility and detection weights learn from semantic labels, as in the paper), stage 2 the
instance subnetwork, "piecewise" (the semantic part, its CRF included, frozen) or "end-to-end".

Owns the loop, its schedule (SGD with momentum, poly or step learning rate, gradient clipping), the
augmentation (random scale, crop, mirror with boxes flipped; detections simulated from the ground
truth by `data.detections`), writing a checkpoint at the end of every epoch and of the stage
(`checkpoint` owns their format) and resuming from it,
the per-step log and the per-epoch log (JSON lines; an epoch's entry
holds held-out metrics when a held-out set is given) and the progress display (`progress`). Stage 2
sees one image per step, as the paper did: every image has its own number of detections. A sample's
detections are its own when it carries them (`data.sources.with_detections`), else simulated.

The run walks the dataset in epochs, each a fresh shuffle seeded by (seed, epoch), so an epoch sees every
image once. Every image of a step is augmented (and its detections simulated) from its own generator,
seeded by (seed, step, position in the step's global batch), and each step's dropout masks
from torch's generator seeded by (seed, process, step): a run resumed from a checkpoint computes what
an uninterrupted one would, and processes can split a batch without sharing a random stream.

Data-parallel (launch and caveats in `distributed`): when a torch.distributed process group is
initialised, `train` wraps the step's loss in DistributedDataParallel; process r of W takes positions
`distributed.shard(batch_size, r, W)` of stage 1's global batch of `batch_size` images, and position r
in stage 2 (W images per step; the learning rate is not rescaled). Losses are weighted so that the
averaged gradient is the gradient of the global batch's loss; rank 0 alone writes log and checkpoints.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from dynseg.sdk.errors import InvalidArgumentError, one_line
from dynseg.sdk.checks import is_int
from dynseg.sdk.files import named_path, write_text_whole
from dynseg.sdk.results import SegmentationResult
from dynseg.sdk.segmenter import Segmenter

from . import distributed, fields
from .data import VOID
from .boxes import mask_boxes
from .checkpoint import (TRAINING_DATA, check_training_data, load_weights, read_training_data, save_checkpoint,
                         training_data_record, weights_fingerprint, write_training_data)
from .data.common import Samples, check_sample
from .data.detections import DetectorOutput, simulate_detections
from .data.sources import detections_fingerprint, inside_image
from .evaluation import evaluate_each, json_ready
from .loss import instance_loss, semantic_loss
from .model import DynamicallyInstantiatedNetwork, require_valid_detections
from .progress import Progress, stage_progress


TrainMode = Literal["piecewise", "end-to-end"]
"""Stage 2 with the semantic part frozen (the paper's piecewise training) or trained with it."""


@dataclass(frozen=True)
class TrainConfig:
    """One training stage's settings; the defaults are sized for short runs on a CPU (docs/training.md sets
    them beside the paper's Sec. 3.5). `steps` also sets the poly schedule's end:
    resuming a stage with more steps than it was saved with raises the learning rate from there."""

    stage: Literal["semantic", "instance"] = "semantic"
    mode: TrainMode = "piecewise"  # stage 2 only
    steps: int = 200
    batch_size: int = 4  # stage 1; stage 2 uses one image per step
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["poly", "step"] = "poly"
    poly_power: float = 0.9
    step_every: int = 100
    step_gamma: float = 0.1
    clip_norm: float = 10.0
    semantic_weight: float = 0.0  # stage 2: weight of the auxiliary semantic cross-entropy
    scale_range: tuple[float, float] = (0.75, 1.25)
    crop: tuple[int, int] | None = None  # (H, W); None keeps the (rescaled) image size
    mirror: bool = True
    seed: int = 0
    # BatchNorm layers use their running statistics and do not update them (their affine parameters
    # still train): small per-process batches then do not matter, and W processes compute what one
    # process with the same global batch would, dropout masks aside (otherwise each process normalises
    # with its own images).
    frozen_batch_norm: bool = False

    def __post_init__(self) -> None:
        fields.choices(self, "stage", ("semantic", "instance"))
        fields.choices(self, "mode", ("piecewise", "end-to-end"))
        fields.choices(self, "schedule", ("poly", "step"))
        fields.ints(self, "steps", "seed", least=0)
        fields.ints(self, "batch_size", "step_every", least=1)
        fields.numbers(self, "learning_rate", "weight_decay", "poly_power", "semantic_weight", low=0)
        fields.numbers(self, "momentum", low=0, high=1, high_open=True)  # 1 and above never forget a step
        fields.numbers(self, "step_gamma", low=0, high=1)  # above 1 the "decay" would grow the learning rate
        fields.numbers(self, "clip_norm", low=0, low_open=True)  # 0 would clip every gradient to nothing
        fields.number_tuple(self, "scale_range", 2, positive=True)
        if self.scale_range[0] > self.scale_range[1]:
            raise InvalidArgumentError(f"TrainConfig.scale_range must be (low, high) with low <= high, got "
                                       f"{self.scale_range!r}")
        if self.crop is not None and not (isinstance(self.crop, tuple) and len(self.crop) == 2 and all(
                is_int(n, numpy=False) and n >= 8 for n in self.crop)):
            raise InvalidArgumentError(f"TrainConfig.crop must be None or (H, W), ints >= 8, got {self.crop!r}")
        fields.flags(self, "mirror", "frozen_batch_norm")


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of step `step` (0-based): poly, lr·(1 − step/steps)^power, or step,
    lr·γ^⌊step/every⌋."""
    if config.schedule == "poly":
        return config.learning_rate * (1.0 - step / config.steps) ** config.poly_power
    return config.learning_rate * config.step_gamma ** (step // config.step_every)


def augment(sample: Mapping[str, Any], config: TrainConfig, rng: np.random.Generator) -> dict:
    """Random scale (bilinear for the image; for labels, each pixel's nearest source pixel), crop and
    mirror of a sample dict with image (H, W, 3) uint8, semantic (H, W), masks (M, H, W), labels (M,),
    boxes (M, 4), and optionally detections (a `DetectorOutput` dict: its boxes follow the masks; those
    left without a pixel, by the scale or the crop, are dropped, the others clipped to the crop)."""
    image = torch.from_numpy(sample["image"]).permute(2, 0, 1).float()[None]  # (1, 3, H, W)
    semantic = torch.from_numpy(np.asarray(sample["semantic"], dtype=np.int64))  # (H, W)
    masks = torch.from_numpy(np.asarray(sample["masks"], dtype=bool))  # (M, H, W)
    scale = rng.uniform(*config.scale_range)
    size = (max(8, round(image.shape[-2] * scale)), max(8, round(image.shape[-1] * scale)))
    # align_corners=True maps pixel x to x * (w' - 1) / (w - 1): the labels and boxes follow the same
    # map (F.interpolate's "nearest" would not: it never samples the last row and column when shrinking)
    factors = [(new - 1) / max(old - 1, 1) for new, old in zip(size, image.shape[-2:])]
    image = F.interpolate(image, size=size, mode="bilinear", align_corners=True)
    rows, columns = (torch.from_numpy(np.minimum(np.rint(np.arange(new) / factor), old - 1).astype(np.int64))
                     for new, old, factor in zip(size, semantic.shape, factors))
    semantic, masks = semantic[rows[:, None], columns], masks[:, rows[:, None], columns]
    sources = (rows.numpy(), columns.numpy())
    offset, crop_size = (0, 0), size
    if config.crop is not None:
        ch, cw = min(config.crop[0], size[0]), min(config.crop[1], size[1])
        y0, x0 = rng.integers(0, size[0] - ch + 1), rng.integers(0, size[1] - cw + 1)
        crop = (..., slice(y0, y0 + ch), slice(x0, x0 + cw))
        image, semantic, masks = image[crop], semantic[crop], masks[crop]
        offset, crop_size = (int(y0), int(x0)), (ch, cw)
    mirrored = config.mirror and rng.random() < 0.5
    if mirrored:
        image, semantic, masks = image.flip(-1), semantic.flip(-1), masks.flip(-1)
    keep = masks.flatten(1).any(1)  # instances the crop kept
    masks = masks[keep]
    out: dict = {
        "image": image[0],  # (3, H, W) float 0..255
        "semantic": semantic,
        "masks": masks,
        "labels": torch.as_tensor(sample["labels"])[keep],
        "boxes": torch.from_numpy(mask_boxes(masks.numpy())),  # (M, 4) float32 xyxy inclusive
    }
    if "detections" in sample:
        out["detections"] = _move_boxes(sample["detections"], sources, offset, crop_size, mirrored)
    return out


def _move_boxes(detections: DetectorOutput, sources: tuple[np.ndarray, np.ndarray] | None, offset: tuple[int, int],
                size: tuple[int, int], mirrored: bool) -> DetectorOutput:
    """Detections (boxes (D, 4) xyxy inclusive) through augment's scale (sources: each scaled row's and
    column's source pixel, ascending; None: no scaling), crop (y0, x0 offset, (h, w) size) and mirror.
    A box comes out as the scaled pixels whose source pixel it covers, as the masks are scaled, so a
    detector's box that was its object's box stays so; those that cover none are dropped, and the rest
    are the pixels they cover in the crop (`inside_image`), so the mirror maps pixel columns onto pixel
    columns."""
    height, width = size
    boxes = np.floor(np.asarray(detections["boxes"], np.float64).reshape(-1, 4))  # the pixels deployment reads
    labels, scores = np.asarray(detections["labels"]), np.asarray(detections["scores"])
    if sources is not None:
        rows, columns = sources
        first = [np.searchsorted(columns, boxes[:, 0], "left"), np.searchsorted(rows, boxes[:, 1], "left")]
        last = [np.searchsorted(columns, boxes[:, 2], "right") - 1, np.searchsorted(rows, boxes[:, 3], "right") - 1]
        boxes = np.stack([*first, *last], axis=1).astype(np.float64)
        covers = (boxes[:, 0] <= boxes[:, 2]) & (boxes[:, 1] <= boxes[:, 3])
        boxes, labels, scores = boxes[covers], labels[covers], scores[covers]
    boxes = boxes - np.array([offset[1], offset[0]] * 2)
    scaled = DetectorOutput(boxes=boxes.astype(np.float32), labels=labels, scores=scores)
    moved = inside_image(scaled, height, width)
    if mirrored:
        boxes = moved["boxes"]
        moved["boxes"] = np.stack([width - 1 - boxes[:, 2], boxes[:, 1], width - 1 - boxes[:, 0], boxes[:, 3]], axis=1)
    return moved


def train(
    model: DynamicallyInstantiatedNetwork,
    dataset: Samples,
    config: TrainConfig,
    *,
    out_dir: str | Path,
    resume: bool = False,
    log_every: int = 10,
    printer: Callable[[str], object] = print,
    live: bool = False,
    held_out: Samples | None = None,
    eval_seed: int = 1,
    epoch_log: str | Path = "epochs.jsonl",
) -> list[dict]:
    """Trains `model` in place on `dataset` (indexable, samples as SyntheticScenes gives them) and
    returns the per-step log (also written to out_dir/log.jsonl, appended to only when resuming).
    A checkpoint goes to out_dir at the end of every epoch and of the stage (`save_checkpoint`, its
    trainer_state.pt naming the stage); `resume` continues from one saved by the same stage and mode,
    and starts afresh where out_dir holds none. Torch's global random state is left as it was.

    Progress: `live` draws a progress bar (for a terminal), otherwise `printer` gets a line every
    `log_every` steps (see `progress`). Per epoch (len(dataset) images, rounded up to whole steps; the
    last epoch may be partial) one JSON line is appended to out_dir / epoch_log (`fit` starts it afresh):
    {"stage", "epoch", "step", "images", "loss" (mean over the epoch's steps this run made),
    "lr" (of its last step), "images_per_s", "seconds" (since the stage began)}, and, when a
    `held_out` dataset is given, "held_out": `evaluation.evaluate`'s metrics (protocol "original") of
    `predict_each(Segmenter.of_network(model).segment, held_out, seed=eval_seed, num_classes=...)`.

    Batches go to the device of the model's parameters. Under an initialised process group every
    process calls this with the same arguments, and gets the same log back: losses are means over the
    step's global batch. Rank 0 alone prints and writes to out_dir (shared between machines when
    resuming), and every process returns once the checkpoint is written.
    """
    out_dir = named_path(out_dir, "out_dir")
    if len(dataset) == 0:
        raise InvalidArgumentError("dataset holds no image: nothing to train on")
    rank, world = distributed.rank(), distributed.world_size()
    main = distributed.is_main()
    stage2 = config.stage == "instance"
    positions = _positions(model, config, rank, world)
    trainable, optimiser = _optimiser(model, config)
    start = 0
    resumed = resume and (out_dir / "trainer_state.pt").is_file()
    # what a resumed stage must share with the run it continues (steps may grow: extending a stage)
    resumable = {k: v for k, v in asdict(config).items() if k != "steps"} | {
        "images": len(dataset), "world": world, "detections": detections_fingerprint(dataset)}
    if resumed:
        start = _resume(out_dir, model, optimiser, config, resumable)
    device = next(model.parameters()).device
    _training_modes(model, config)
    objective: nn.Module = _Objective(model, config)
    if torch.distributed.is_initialized():
        # Unused parameters: stage 1 leaves the instance part alone, and an image without detections
        # skips the instance CRF. Those unused everywhere keep grad None, as in one process.
        objective = DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None,
                                            find_unused_parameters=True)
    images_per_step = _images_per_step(config)
    steps_per_epoch = max(1, -(-len(dataset) // images_per_step))
    log, epoch_losses, began = [], [], time.perf_counter()
    instances_drawn = 0  # stage 2's ground-truth instances: none in any step means it learns nothing
    progress = stage_progress(config.stage, config.steps, start, images_per_step=images_per_step,
                              live=live and main, printer=printer if main else _silent, every=log_every)
    with ExitStack() as files:
        files.callback(progress.close)  # also on Ctrl-C or an error: a live bar hides the terminal's cursor
        # each step seeds dropout's generators, the CPU's and the model's device's: the caller's come back
        files.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
        log_file = epoch_file = None  # the main process's
        with distributed.fail_together(f"the start of stage {config.stage!r} in {out_dir}"):
            if main:
                log_file, epoch_file = _open_logs(files, out_dir, epoch_log, config.stage, start, resumed,
                                                  finished=start == config.steps)
        for step in range(start, config.steps):
            lr = learning_rate(config, step)
            for group in optimiser.param_groups:
                group["lr"] = lr
            _seed_dropout(config.seed, step, rank, device)
            if stage2:
                batch = _instance_batch(dataset, config, step, positions[0], model.config.num_classes)
                instances_drawn += len(batch["gt_labels"])
                share = 1 / world
            else:
                batch, share = _semantic_batch(dataset, config, step, positions, model.config.num_classes,
                                               model.config.score_ceiling)
            batch = {key: value.to(device) for key, value in batch.items()}
            global_loss, norm = _step(objective, optimiser, trainable, batch, share, config, step,
                                      first=step == start, lr=lr)
            entry = {"step": step + 1, "loss": global_loss, "grad_norm": norm,
                     "lr": lr, "seconds": time.perf_counter() - began}
            log.append(entry)
            epoch_losses.append(global_loss)
            if log_file is not None:
                log_file.write(json.dumps(entry) + "\n")
                progress.update(step + 1, global_loss)
            if (step + 1) % steps_per_epoch != 0 and step + 1 != config.steps:
                continue
            epoch, epoch_loss, epoch_losses = -(-(step + 1) // steps_per_epoch), float(np.mean(epoch_losses)), []
            with distributed.fail_together(f"the end of epoch {epoch} (step {step + 1})"):
                if log_file is not None and epoch_file is not None:  # the main process ends the epoch
                    record: dict[str, object] = {
                        "stage": config.stage, "epoch": epoch, "step": step + 1,
                        "images": (step + 1) * images_per_step, "loss": epoch_loss, "lr": entry["lr"],
                        "images_per_s": progress.throughput(step + 1), "seconds": time.perf_counter() - began,
                    }
                    if held_out is not None:
                        record["held_out"] = _held_out_scores(model, config, held_out, eval_seed, epoch, progress)
                    epoch_file.write(json.dumps(json_ready(record), allow_nan=False) + "\n")
                    # the logs reach the disk before the checkpoint that resuming would continue after them
                    for logged in (log_file, epoch_file):
                        logged.flush()
                        os.fsync(logged.fileno())
                    save_checkpoint(out_dir, model, optimiser, step + 1, stage=_stage_name(config), settings=resumable)
    if stage2 and start < config.steps and distributed.all_reduce([instances_drawn])[0] == 0 and main:
        printer(f"Warning: stage 2 drew no image with a ground-truth instance in its {config.steps - start} steps: "
                "the instance subnetwork learnt nothing (does the dataset hold any object?)")
    with distributed.fail_together(f"the end of stage {config.stage!r}"):  # every process returns after rank 0 wrote
        if main:
            if start == config.steps:  # no step ran, so no epoch's end saved it
                save_checkpoint(out_dir, model, optimiser, config.steps, stage=_stage_name(config),
                                settings=resumable)
            settings = asdict(config) | {"images_per_step": images_per_step}
            if stage2:  # batch_size is stage 1's: stage 2 takes one image per process and step
                del settings["batch_size"]
            write_text_whole(out_dir / "train_config.json", json.dumps(settings, indent=2))
    return log


def _positions(model: DynamicallyInstantiatedNetwork, config: TrainConfig, rank: int, world: int) -> range:
    """The positions in each step's global batch that process `rank` of `world` takes (stage 2: one
    image each), or InvalidArgumentError where the stage cannot train so."""
    if config.stage == "instance":
        return range(rank, rank + 1)
    positions = distributed.shard(config.batch_size, rank, world)
    if not config.frozen_batch_norm and len(positions) < 2 and _has_batch_norm(model.semantic):
        # Batch statistics of one image: the pyramid pooling's 1x1 branch has a single value per channel
        raise InvalidArgumentError(
            f"stage 1 would train BatchNorm on {len(positions)} image per process (batch_size {config.batch_size} "
            f"over {world} process(es)): give batch_size at least {2 * world}, or freeze BatchNorm "
            "(TrainConfig.frozen_batch_norm)")
    return positions


def _optimiser(model: DynamicallyInstantiatedNetwork, config: TrainConfig) -> tuple[list[nn.Parameter],
                                                                                  torch.optim.Optimizer]:
    """The stage's trainable parameters (stage 2 piecewise freezes the semantic part, its CRF included)
    and SGD over them."""
    frozen = config.stage == "instance" and config.mode == "piecewise"
    semantic_part = [model.semantic] + ([model.semantic_crf] if model.semantic_crf is not None else [])
    for parameter in (p for module in semantic_part for p in module.parameters()):
        parameter.requires_grad_(not frozen)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return trainable, torch.optim.SGD(trainable, lr=config.learning_rate, momentum=config.momentum,
                                      weight_decay=config.weight_decay)


def _open_logs(files: ExitStack, out_dir: Path, epoch_log: str | Path, stage: str, start: int,
               resumed: bool, *, finished: bool) -> tuple[IO[str], IO[str]]:
    """The main process's step log and epoch log, open for this run (closed with `files`). A stage that
    starts afresh removes an earlier run's checkpoint and metrics, which until its first epoch's end would
    pass for its own (and its state would resume it); an unfinished stage removes train_config.json,
    which marks a finished one (`dynseg eval` warns of a checkpoint without it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if resumed:  # steps an interrupted run made after its last checkpoint are made again
        _drop_entries(out_dir / "log.jsonl", lambda entry: entry.get("step", 0) > start)
        _drop_entries(out_dir / epoch_log, lambda entry: entry.get("stage") == stage and entry.get("step", 0) > start)
    stale = [] if resumed else list(_CHECKPOINT_FILES)
    if not finished:
        stale.append("train_config.json")
    for path in (out_dir / name for name in stale):
        if not path.is_dir():  # a folder in a file's place fails where the file is written, named there
            path.unlink(missing_ok=True)
    # a fresh run starts its step log afresh: appending would interleave two runs' steps
    return (files.enter_context(open(out_dir / "log.jsonl", "a" if resumed else "w")),
            files.enter_context(open(out_dir / epoch_log, "a")))


def _step(objective: nn.Module, optimiser: torch.optim.Optimizer, trainable: list[nn.Parameter],
          batch: dict[str, Tensor], share: float, config: TrainConfig, step: int, *, first: bool,
          lr: float) -> tuple[float, float]:
    """One optimisation step on this process's part of the batch, `share` of the global batch's loss.
    Returns the global batch's loss and the gradient norm before clipping; refuses a step that diverged."""
    try:
        loss = objective(batch)  # mean over this process's part of the batch
    except InvalidArgumentError as error:  # after a step, most often what a diverging update made
        if not first:
            raise InvalidArgumentError(f"step {step + 1}: {error} (if the loss was climbing, see log.jsonl, "
                                       f"the training diverged: lower the learning rate, {lr:g} at this step)") \
                from error
        if config.stage == "instance":  # the network as stage 1 left it
            raise InvalidArgumentError(f"stage 2's first step: {error} (if stage 1's loss was climbing, see "
                                       "semantic/log.jsonl, stage 1 diverged: lower the learning rate)") from error
        raise
    optimiser.zero_grad(set_to_none=True)
    # DDP averages gradients over the W processes, so W x share makes them the global mean's.
    (loss * (share * distributed.world_size())).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.clip_norm))
    global_loss = distributed.all_reduce([loss.item() * share])[0]
    # both the same on every process: DDP has averaged the gradients
    if not (math.isfinite(norm) and math.isfinite(global_loss)):
        raise InvalidArgumentError(f"training diverged at step {step + 1}: its loss ({global_loss:.3g}) or "
                                   f"gradients (norm {norm:.3g}) are not finite; lower the learning rate ({lr:g})")
    optimiser.step()
    return global_loss, norm


def _held_out_scores(model: DynamicallyInstantiatedNetwork, config: TrainConfig, held_out: Samples, seed: int,
                     epoch: int, progress: Progress) -> dict:
    """The held-out set's metrics at the end of an epoch (fractions, as the epoch log keeps them), noted
    on the progress display in %, as `dynseg eval` prints them; the model goes back to training."""
    num_classes = model.config.num_classes
    scores = evaluate_each(predict_each(Segmenter.of_network(model).segment, held_out, seed=seed,
                                        num_classes=num_classes), num_classes=num_classes)
    _training_modes(model, config)
    progress.note(f"[{config.stage}] epoch {epoch}: held-out AP^r_vol {100 * scores['ap_r_vol']:.1f}%, "
                  f"Matching IoU {100 * scores['matching_iou']:.1f}%")
    return scores


def _drop_entries(path: Path, dropped: Callable[[dict], bool]) -> None:
    """Rewrites the JSON-lines log at `path` without the entries `dropped` picks (no file: nothing), and
    without a last line that a write cut short (a full disk, a power cut) left without its newline.
    InvalidArgumentError names a line that is not a JSON object: the file is not a log of this trainer's."""
    if not path.is_file():
        return
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    if not text.endswith("\n"):
        lines = lines[:-1]
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict):
            raise InvalidArgumentError(f"cannot resume: line {number} of {path} is not a JSON object ({line[:60]!r}); "
                                       "move the file away to start its log afresh")
        if not dropped(entry):
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


_DROPOUT = 0x64726F70  # tags dropout's seeds apart from the images' ([seed, step, position])


def _seed_dropout(seed: int, step: int, rank: int, device: torch.device) -> None:
    """Seeds the generators dropout draws from in this process's step: the CPU's and, for a model on a
    GPU, its device's (torch.manual_seed would reseed every GPU, which fork_rng does not restore)."""
    state = int(np.random.SeedSequence([seed, step, rank, _DROPOUT]).generate_state(1)[0])
    torch.default_generator.manual_seed(state)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(state)


def _stage_name(config: TrainConfig) -> str:
    """What a checkpoint's trainer state records of the stage that saved it: a state is resumed only by
    the same stage and mode, whose optimiser steps the same parameters."""
    return config.stage if config.stage == "semantic" else f"instance, {config.mode}"


def _resume(out_dir: Path, model: DynamicallyInstantiatedNetwork, optimiser: torch.optim.Optimizer,
            config: TrainConfig, settings: Mapping[str, Any]) -> int:
    """Loads out_dir's weights and optimiser state into `model` and `optimiser` and returns the step
    they were saved at; InvalidArgumentError, in one line, for files that are not a resumable state:
    another stage's or mode's, one saved with other `settings` (train's, each named), or one whose
    weights are not model.safetensors' (a save cut short)."""
    where = out_dir / "trainer_state.pt"
    # the way to start this stage alone afresh: a run without resume would delete a finished stage 1 too
    afresh = f"; to train this stage afresh, delete {where} and resume"
    try:
        state = torch.load(where, weights_only=True)
        step, optimiser_state = state["step"], state["optimiser"]
    except MemoryError:  # the machine's, not the file's
        raise
    except Exception as error:  # torch.load's own errors, EOFError, KeyError, TypeError, ...
        raise InvalidArgumentError(f"cannot resume from {where}: {type(error).__name__}: {one_line(error)}"
                                   f"{afresh}") from None
    if not is_int(step, numpy=False) or not 0 <= step <= config.steps:  # True is no step
        raise InvalidArgumentError(f"cannot resume from {where}: its step must be an int in 0..{config.steps} "
                                   f"(this stage's steps), got {step!r}{afresh}")
    saved_by, stage = state.get("stage"), _stage_name(config)
    if saved_by != stage:
        by = "records no stage (an older dynseg wrote it)" if saved_by is None else f"was saved by stage {saved_by!r}"
        raise InvalidArgumentError(f"cannot resume from {where}: it {by}, not this stage's {stage!r}{afresh}")
    saved = state.get("settings")
    if isinstance(saved, Mapping) and saved:  # states saved before the settings were recorded: unchecked
        changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in settings.items()
                   if saved.get(key) != value]
        if changed:
            raise InvalidArgumentError(f"cannot resume from {where}: it was saved with other settings "
                                       f"({'; '.join(changed)}): give the run's options again{afresh}")
    try:
        load_weights(model, out_dir / "model.safetensors", "this stage's network")
    except InvalidArgumentError as error:
        raise InvalidArgumentError(f"cannot resume from {out_dir}: {error}{afresh}") from None
    if weights_fingerprint(model) != state.get("weights_sha256"):
        raise InvalidArgumentError(f"cannot resume from {where}: its weights fingerprint is not that of "
                                   f"{out_dir / 'model.safetensors'}, which another save replaced{afresh}")
    try:
        optimiser.load_state_dict(optimiser_state)
    except ValueError as error:  # e.g. a piecewise run saved before the semantic CRF was frozen with it
        raise InvalidArgumentError(
            f"{where} was saved for other trainable parameters than this stage's "
            f"({config.stage}, {config.mode}): resume with the dynseg version that wrote it, or start the "
            f"stage afresh ({error})") from None
    return int(step)


def _silent(*_: object) -> None:
    pass


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, _BATCH_NORMS) for m in module.modules())


def _training_modes(model: DynamicallyInstantiatedNetwork, config: TrainConfig) -> None:
    """Train mode, except the parts whose batch-norm statistics the stage keeps, and stage 2's frozen
    semantic part."""
    model.train()
    if config.stage == "instance" and config.mode == "piecewise":
        model.semantic.eval()  # frozen whole: stage 2 learns on the features deployment will give it
    if config.frozen_batch_norm:
        _keep_batch_norm_statistics(model)
    elif config.stage == "instance":
        # One image per step: batch-norm statistics cannot be estimated from it (the pyramid pooling's 1x1
        # branch even refuses), so stage 2 keeps the semantic part's from stage 1; end to end, the semantic
        # part's dropout still trains with it.
        _keep_batch_norm_statistics(model.semantic)


def _keep_batch_norm_statistics(module: nn.Module) -> None:
    for part in module.modules():
        if isinstance(part, _BATCH_NORMS):
            part.eval()


class _Objective(nn.Module):
    """The step's loss as a module. DistributedDataParallel all-reduces the gradients of what its
    module's forward computes, and stage 1 calls `semantic_unary` and the semantic CRF, not the
    network's forward: wrapping this module rather than the network covers both stages with one code
    path."""

    def __init__(self, model: DynamicallyInstantiatedNetwork, config: TrainConfig):
        super().__init__()
        self.model = model
        self.stage2 = config.stage == "instance"
        self.semantic_weight = config.semantic_weight

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        if self.stage2:
            return _instance_loss(self.model, batch, self.semantic_weight)
        logits = self.model.semantic_unary(batch["images"])  # (B, K+1, H, W)
        crf = self.model.semantic_crf
        if crf is not None:  # one image at a time: each has its own detections
            per_image = zip(logits, batch["images"], *(batch[k].split(batch["counts"].tolist())
                                                       for k in ("boxes", "labels", "scores")))
            logits = torch.stack([crf(unary, image, boxes, labels, scores)[0]
                                  for unary, image, boxes, labels, scores in per_image])
        return semantic_loss(logits, batch["targets"])


def _images_per_step(config: TrainConfig) -> int:
    """The images one step takes over all processes: stage 2 takes one per process."""
    return distributed.world_size() if config.stage == "instance" else config.batch_size


def _draw(dataset: Samples, config: TrainConfig, step: int, position: int,
          num_classes: int) -> tuple[dict, np.random.Generator]:
    """The augmented sample at `position` of step `step`'s global batch, checked, and its generator
    (stage 2 goes on to draw the detections from it)."""
    rng = np.random.default_rng([config.seed, step, position])
    index = _dataset_index(config.seed, step * _images_per_step(config) + position, len(dataset))
    sample = dataset[index]
    check_sample(sample, f"dataset[{index}]", num_classes)
    return augment(sample, config, rng), rng


def _dataset_index(seed: int, draw: int, size: int) -> int:
    """The dataset image the run's `draw`-th image (counted over steps and positions) reads: each run of
    `size` draws is one epoch, a shuffle of the whole dataset (indices drawn independently would leave
    about 37 % of the images out of each epoch and repeat others within a batch)."""
    return int(_shuffle(seed, draw // size, size)[draw % size])


@functools.lru_cache(maxsize=2)  # a step's images share one epoch, or two at its boundary
def _shuffle(seed: int, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, size]).permutation(size)


def _semantic_batch(dataset: Samples, config: TrainConfig, step: int, positions: range, num_classes: int,
                    score_ceiling: float | None = None) -> tuple[dict, float]:
    """This process's images (B, 3, H, W) and class maps (B, H, W), each cropped at a random place to
    the smallest image of the global batch, their detections for the semantic CRF's detection potential
    (as stage 2 draws them; boxes (ΣD, 4), labels, scores, and counts (B,) D per image), and this
    process's share of the global batch's non-void pixels. score_ceiling: the network's
    (`ModelConfig.score_ceiling`), which the detections' scores may not pass; None: not checked."""
    drawn = []
    for position in positions:
        sample, rng = _draw(dataset, config, step, position, num_classes)
        drawn.append((_with_detections(sample, rng, num_classes), rng))
    height, width = (int(v) for v in distributed.all_reduce(
        [min(s["image"].shape[1] for s, _ in drawn), min(s["image"].shape[2] for s, _ in drawn)], op="min"))
    image_crops, target_crops, detections = [], [], []
    for sample, rng in drawn:
        # anywhere in the image: always the top-left corner would never train on the bottom rows
        y0 = int(rng.integers(sample["image"].shape[1] - height + 1))
        x0 = int(rng.integers(sample["image"].shape[2] - width + 1))
        image_crops.append(sample["image"][:, y0:y0 + height, x0:x0 + width])
        target_crops.append(sample["semantic"][y0:y0 + height, x0:x0 + width])
        # the boxes the crop keeps, clipped and floored as forward does
        kept = _move_boxes(sample["detections"], None, (y0, x0), (height, width), mirrored=False)
        tensors = (torch.from_numpy(np.asarray(kept[key])) for key in ("boxes", "labels", "scores"))
        detections.append(require_valid_detections(*tensors, height=height, width=width, num_classes=num_classes,
                                                   score_ceiling=score_ceiling))
    images, targets = torch.stack(image_crops), torch.stack(target_crops)
    pixels = int((targets != VOID).sum())
    total = distributed.all_reduce([pixels])[0]
    boxes, labels, scores = (torch.cat(parts) for parts in zip(*detections))
    batch = {"images": images, "targets": targets, "boxes": boxes, "labels": labels, "scores": scores,
             "counts": torch.tensor([len(d[0]) for d in detections], dtype=torch.int64)}
    return batch, pixels / total if total else 1 / distributed.world_size()


def _detections_of(sample: Mapping[str, Any], image_size: tuple[int, int], rng: np.random.Generator,
                   num_classes: int) -> DetectorOutput:
    """A sample's own detections (from a results file, see `data.sources`) when it has them, else
    detections simulated from its ground truth with `rng`."""
    return sample.get("detections") or simulate_detections(
        np.asarray(sample["boxes"]), np.asarray(sample["labels"]), image_size=image_size, rng=rng,
        num_classes=num_classes)


def _with_detections(sample: dict, rng: np.random.Generator, num_classes: int) -> dict:
    """The augmented sample with its detections, simulated ones drawn with the sample's generator."""
    height, width = sample["image"].shape[1:]
    return {**sample, "detections": _detections_of(sample, (height, width), rng, num_classes)}


def _instance_batch(dataset: Samples, config: TrainConfig, step: int, position: int, num_classes: int) -> dict:
    """One augmented image, its ground truth and its detections: the sample's own (from a results
    file, see `data.sources`) when it has them, else simulated from the ground truth."""
    sample = _with_detections(*_draw(dataset, config, step, position, num_classes), num_classes)
    # the pixels each box covers, as stage 1's crops and deployment take them (simulated boxes are not whole)
    detections = inside_image(sample["detections"], *sample["image"].shape[1:])
    return {
        "image": sample["image"],  # (3, H, W)
        "semantic": sample["semantic"],  # (H, W)
        "masks": sample["masks"],  # (M, H, W) bool
        "gt_labels": sample["labels"],  # (M,)
        "boxes": torch.from_numpy(detections["boxes"]),  # (D, 4)
        "labels": torch.from_numpy(detections["labels"]),
        "scores": torch.from_numpy(detections["scores"]),
    }


def _instance_loss(model: DynamicallyInstantiatedNetwork, batch: dict[str, Tensor], semantic_weight: float) -> Tensor:
    out = model(batch["image"], batch["boxes"], batch["labels"], batch["scores"])
    void = batch["semantic"] == VOID
    loss = instance_loss(out.instance_logits, batch["boxes"], batch["labels"], batch["scores"], batch["masks"],
                         batch["gt_labels"], void)
    if semantic_weight > 0:
        loss = loss + semantic_weight * semantic_loss(out.semantic_logits[None], batch["semantic"][None])
    return loss


# What a run leaves in its folders (checkpoint, resume state, configs, eval's metrics): fit clears them.
# A stage's checkpoint and what describes it; with its training data and step log, a run's files
_CHECKPOINT_FILES = ("model.safetensors", "model.json", "trainer_state.pt", "train_config.json", "metrics.json",
                     "metrics.md")
_RUN_FILES = (*_CHECKPOINT_FILES, TRAINING_DATA, "log.jsonl")


def fit(
    model: DynamicallyInstantiatedNetwork,
    dataset: Samples,
    *,
    out_dir: str | Path,
    semantic: TrainConfig,
    instance: TrainConfig,
    printer: Callable[[str], object] = print,
    live: bool = False,
    held_out: Samples | None = None,
    eval_seed: int = 1,
    training_data: Mapping[str, Any] | None = None,
    resume: bool = False,
) -> dict[str, list[dict]]:
    """The paper's procedure: stage 1 (semantic), shape templates by k-means of the training masks,
    then stage 2 (instance, piecewise or end-to-end). Checkpoints land in out_dir/semantic and
    out_dir (the final model); both stages append their epochs to out_dir/epochs.jsonl (see `train`),
    stage 2's with the metrics on `held_out` when it is given. An earlier run's checkpoints, logs and
    `dynseg eval` metrics (_RUN_FILES) in out_dir and out_dir/semantic go first, so none of them is taken
    for this run's; exports and other files stay. An interrupted run leaves each started stage's
    checkpoint of its last finished epoch: `resume` keeps out_dir's files and continues each stage from
    its checkpoint (`train(..., resume=True)`; a finished stage 1 makes no step), given the same
    arguments.
    `training_data` (write_training_data's keywords: dataset, seed, image_size, split) is recorded in
    each stage's folder before the stage starts, so that any checkpoint it leaves tells `dynseg eval`
    which scenes it was trained on."""
    out_dir = named_path(out_dir, "out_dir")
    for name, config in (("semantic", semantic), ("instance", instance)):
        # TrainConfig's stage defaults to "semantic": instance=TrainConfig(steps=N) would train stage 1 twice
        if not isinstance(config, TrainConfig) or config.stage != name:
            raise InvalidArgumentError(f"{name} must be a TrainConfig(stage={name!r}, ...), got "
                                       f"{type(config).__name__} of stage {getattr(config, 'stage', None)!r}")
    if len(dataset) == 0:  # before the last run's files go: a run that cannot start leaves them
        raise InvalidArgumentError("dataset holds no image: nothing to train on")
    for config in (semantic, instance):
        _positions(model, config, distributed.rank(), distributed.world_size())
    if training_data is not None:  # before anything is written
        check_training_data(training_data)
    epochs = (out_dir / "epochs.jsonl").resolve()  # not relative to stage 1's out_dir/semantic
    out_dir.mkdir(parents=True, exist_ok=True)
    with distributed.fail_together(f"the start of the run in {out_dir}"):
        if distributed.is_main() and not resume:
            for folder in (out_dir, out_dir / "semantic"):
                for name in _RUN_FILES:
                    (folder / name).unlink(missing_ok=True)
            epochs.write_text("")  # a new run: the stages append to it, an earlier run's epochs go
        if resume and training_data is not None:  # a resumed run trains on what it trained on
            wanted = training_data_record(**training_data)
            for folder in (out_dir / "semantic", out_dir):
                recorded = read_training_data(folder)
                if recorded is not None and recorded != wanted:
                    raise InvalidArgumentError(f"cannot resume: {folder / TRAINING_DATA} records {recorded}, this run "
                                               f"{wanted}: give the run's dataset options again, or start afresh")
        # recorded before each stage, whose first epoch's end already leaves a checkpoint `dynseg eval` takes
        _record_training_data(out_dir / "semantic", training_data)
    logs = {"semantic": train(model, dataset, semantic, out_dir=out_dir / "semantic", printer=printer, live=live,
                              epoch_log=epochs, resume=resume)}
    if model.config.instance.shape_term:
        initialise_templates(model, dataset, seed=instance.seed)
    # stage 1 made steps in this resumed run (it was extended): stage 2's checkpoint holds the semantic part
    # it started from, and resuming it would bring that back; stage 2 starts afresh from the new stage 1
    restart = resume and bool(logs["semantic"]) and (out_dir / "trainer_state.pt").is_file()
    with distributed.fail_together(f"the start of stage 'instance' in {out_dir}"):
        if restart and distributed.is_main():
            printer(f"Note: stage 1 made steps, so stage 2 starts afresh (its checkpoint in {out_dir} was trained from "
                    "stage 1's earlier weights)")
            _drop_entries(epochs, lambda entry: entry.get("stage") == "instance")
        _record_training_data(out_dir, training_data)
    logs["instance"] = train(model, dataset, instance, out_dir=out_dir, printer=printer, live=live,
                             held_out=held_out, eval_seed=eval_seed, epoch_log=epochs, resume=resume and not restart)
    return logs


def _record_training_data(checkpoint: Path, training_data: Mapping[str, Any] | None) -> None:
    if training_data is not None and distributed.is_main():  # rank 0 writes, as it writes the checkpoint
        checkpoint.mkdir(parents=True, exist_ok=True)
        write_training_data(checkpoint, **training_data)


def initialise_templates(model: DynamicallyInstantiatedNetwork, dataset: Samples, *, seed: int = 0,
                         images: int = 200) -> None:
    """The shape templates by k-means of the instance masks of the first `images` training images."""
    masks, boxes = [], []
    for index in range(min(len(dataset), images)):
        sample = dataset[index]
        masks.extend(sample["masks"])
        boxes.extend(sample["boxes"])
    if masks:
        model.instance_unaries.initialise_templates(masks, boxes, seed=seed)


def evaluation_inputs(dataset: Samples, *, seed: int,
                      num_classes: int) -> Iterator[tuple[Tensor, dict[str, Tensor], dict[str, np.ndarray]]]:
    """Yields (image (3, H, W) float 0..255, detections, ground truth) for every sample. Detections
    are the sample's own when it has them (`data.sources.with_detections`), else simulated from the
    ground truth by a generator seeded by (seed, index), so every method evaluated with the same seed
    sees the same detections."""
    for index in range(len(dataset)):
        sample = dataset[index]
        check_sample(sample, f"dataset[{index}]", num_classes)
        image = torch.from_numpy(sample["image"]).permute(2, 0, 1).float()
        detections = _detections_of(sample, (image.shape[1], image.shape[2]), np.random.default_rng([seed, index]),
                                    num_classes)
        truth = {"masks": sample["masks"], "labels": sample["labels"], "void": sample["semantic"] == VOID}
        if "crowd_masks" in sample:  # COCO's crowds, for COCO mask AP's crowd rule
            truth |= {"crowd_masks": sample["crowd_masks"], "crowd_labels": sample["crowd_labels"]}
        yield image, {k: torch.from_numpy(detections[k]) for k in ("boxes", "labels", "scores")}, truth


# What evaluation runs on each image: `Segmenter.segment`, of an exported model or of a network in memory
# (`Segmenter.of_network`). Image (H, W, 3) uint8 RGB, boxes (D, 4), labels (D,), scores (D,) in; the SDK's
# result out, so that evaluation scores what a deployed model returns.
Segment = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], SegmentationResult]


def predict(model: DynamicallyInstantiatedNetwork, dataset: Samples, *, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The network's predictions and the ground truths of every image of `dataset` (see `predict_each`),
    as the two lists `evaluation.evaluate` takes. Every mask of the dataset is then in memory: to score a
    whole split, `evaluation.evaluate_each(predict_each(...))` holds one image's."""
    pairs = list(predict_each(Segmenter.of_network(model).segment, dataset, num_classes=model.config.num_classes,
                              seed=seed))
    return [p for p, _ in pairs], [t for _, t in pairs]


def predict_each(segment: Segment, dataset: Samples, *, num_classes: int,
                 seed: int = 0) -> Iterator[tuple[dict, dict]]:
    """Runs `segment` (`Segmenter.of_network(model).segment`, or an exported model's) over `dataset`
    with the detections `evaluation_inputs` gives (the samples' own, or simulated from the ground truth:
    the same detections for the same seed), yielding each image's (prediction, ground truth) as
    `evaluation.evaluate` reads them, one image at a time."""
    if isinstance(segment, nn.Module):  # callable too, but fed numpy arrays it fails deep inside the network
        raise InvalidArgumentError("segment must be a Segment, such as Segmenter.of_network(model).segment, "
                                   "not the network itself")
    for image, detections, truth in evaluation_inputs(dataset, seed=seed, num_classes=num_classes):
        result = segment(image.permute(1, 2, 0).to(torch.uint8).numpy(),
                         *(detections[k].numpy() for k in ("boxes", "labels", "scores")))
        ids = np.array([instance.id for instance in result.instances]).reshape(-1, 1, 1)
        yield ({"masks": result.instance_map[None] == ids,
                "labels": np.array([instance.class_id for instance in result.instances], np.int64),
                "scores": np.array([instance.score for instance in result.instances], np.float64)}, truth)
