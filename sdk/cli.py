"""The `dynseg` command line: parses and validates arguments, then delegates to the SDK.

Commands: `dynseg --version`, `dynseg --help`, `dynseg demo` (dynseg.sdk.demo.run), and, with torch
installed, `dynseg train` (dynseg.trainer.train.fit) and `dynseg eval` (dynseg.sdk.commands.evaluate, for a
checkpoint or an exported model). Deployment (docs/deploy.md): `dynseg export` (torch;
dynseg.export.onnx.export_onnx), `dynseg infer` and `dynseg bench` (no torch), `dynseg validate` and
`dynseg quickstart` (torch), each over its module in dynseg.sdk.commands. What stays here is
resolving arguments and their defaults (eval's dataset, seed and image size come from the
checkpoint's record), and the messages.
Errors dynseg raises on purpose, and files or folders the system refuses, print one line and exit
with status 1.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional, cast, get_args

import typer
from typer.core import TyperCommand, TyperGroup

from . import __version__
from .commands import defaults, parity
from .commands import quickstart as quickstart_job
from .commands.bench import BENCH_DETECTIONS
from .checks import INT32_MAX
from .errors import DynsegError, InvalidArgumentError, needs_trainer, one_line
from .files import write_text_whole
from .graph import (DEFAULT_ENGINE_DETECTIONS, DEFAULT_ENGINE_SIZES, DEFAULT_MAX_DETECTIONS, ENGINE_SUFFIXES,
                    MAX_DETECTIONS)

if TYPE_CHECKING:
    from dynseg.trainer.train import TrainMode

    from .commands.progress import ItemProgress
    from .segmenter import Backend

__all__ = ["app"]


class _Commands(TyperGroup):
    """The commands, with what the system refused reported in one line instead of a traceback: a file or
    folder (an --out that cannot be created, a full disk, a symbolic link loop), or memory."""

    def invoke(self, ctx):  # click's Context: typer 0.29 vendors click, older typers take click's own
        try:
            return super().invoke(ctx)
        except OSError as error:
            if error.errno == errno.EPIPE:  # output piped into `head`: click ends that quietly
                raise
            if error.filename and _dangling(Path(error.filename)):
                raise _fail(f"{error.filename} {_DANGLING}") from error
            where = f": {error.filename}" if error.filename else ""
            raise _fail(f"{error.strerror or error}{where}") from error
        except (MemoryError, RuntimeError) as error:
            if str(error).startswith("Symlink loop from"):  # pathlib's resolve() before Python 3.13
                raise _fail(str(error)) from error
            if not _out_of_memory(error):
                raise
            raise _fail(f"out of memory ({one_line(error)}): this machine could not give the command the memory "
                        "it needed") from error


class _Command(TyperCommand):
    """A command that refuses an empty value for any of its arguments: pathlib reads "" as the current
    folder, so an unset `$OUT` would have `dynseg train` replace the run in the folder it was started in."""

    def parse_args(self, ctx, args):  # click's Context (see _Commands.invoke) and the command's words
        if set(args) & set(ctx.help_option_names):
            return super().parse_args(ctx, args)
        given, _, _ = self.make_parser(ctx).parse_args(args=list(args))  # the words, before "" becomes "."
        for param in self.get_params(ctx):
            value = given.get(param.name)
            if value == "" or (isinstance(value, (list, tuple)) and "" in value):
                raise typer.BadParameter('is empty (an unset shell variable?): give a value (of a path, "." for '
                                         "the current folder)", ctx=ctx,
                                         param_hint=" / ".join(f"'{o}'" for o in param.opts))
        return super().parse_args(ctx, args)


_DANGLING = "is a symbolic link that leads nowhere (a loop, or to something missing)"


def _dangling(path: Path) -> bool:
    try:
        return path.is_symlink() and not path.exists()
    except OSError:  # a name too long, say: the caller reports the error it has
        return False


def _out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a refused allocation: Python's and numpy's MemoryError, or torch's (its
    OutOfMemoryError, a RuntimeError, or the RuntimeError of its CPU allocator)."""
    return (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in str(error))


app = typer.Typer(
    cls=_Commands,
    name="dynseg",
    help="Dynamically Instantiated Network instance segmentation: the CRF demo, training, evaluation and deployment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "bbox [x, y, w, h]" is no markup
)


def _version_line() -> str:
    from . import _native

    try:
        kernels = (f"CPU and CUDA kernels: {_native.cuda_build()}" if _native.cuda_compiled()
                   else "CPU kernels only, built without CUDA")
        native = f"{_native.native_version()}, {kernels}"
    except DynsegError as error:  # the package still reports its own version without the library
        native = f"unavailable ({error})"
    return f"dynseg {__version__} (native library {native})"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(_version_line())
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True,
        help="Print dynseg's version and the native library's version, then exit.",
    ),
) -> None:
    """Dynamically Instantiated Network instance segmentation: the CRF demo, training, evaluation and deployment."""


@app.command(cls=_Command)
def demo(
    out: Path = typer.Option(..., "--out", file_okay=False, help="Folder to write before_after.png into."),
    image: Optional[Path] = typer.Option(
        None, "--image", exists=True, dir_okay=False, readable=True,
        help="Photo to segment (default: the shipped 500x375 coffee photo).",
    ),
    iterations: int = typer.Option(5, "--iterations", min=0, max=INT32_MAX, help="Mean-field iterations."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=INT32_MAX,
                                          help="CPU threads (default: all cores)."),
) -> None:
    """Clean up a blocky colour labelling of a photo with the dense CRF; save and time it."""
    from . import demo as demo_job

    _make_folder(out, "--out", out)
    try:
        result = demo_job.run(out, image=image, iterations=iterations, threads=threads)
    except DynsegError as error:
        raise _fail(str(error)) from error
    typer.echo(f"wrote {result['output']} (photo | labels before | labels after the CRF)")
    typer.echo(
        f"{result['image']}: {result['width']}x{result['height']} px, {result['labels']} labels, "
        f"{result['iterations']} iterations, {result['changed']:.1%} of pixels relabelled"
    )
    typer.echo(
        f"dense_crf: best of {result['runs']} = {result['best_ms']:.1f} ms "
        f"on {result['threads']} thread(s), lattice builds included"
    )


def _item_progress(label: str, total: int) -> ItemProgress:
    """A command's per-image display: a live bar on a terminal, else a plain line per image."""
    from .commands.progress import item_progress

    return item_progress(label, total, live=sys.stdout.isatty(), printer=typer.echo)


def _counted(count: int, noun: str) -> str:
    """"1 image", "3 images": a count and its noun (plural by a trailing s)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _fail(message: str) -> typer.Exit:
    """Print `Error: message` on stderr; the caller raises the returned Exit (status 1)."""
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(1)


def _make_folder(folder: Path, option: str, given: Path) -> None:
    """Creates `folder` (with its parents) for the output `option` names (`given`), or fails naming the
    option, before any long work: also where the folder exists but cannot be written (a read-only disk)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _fail(f"{option} {given}: {_folder_problem(folder) or error.strerror or str(error)}") from error
    _check_writable(folder, option, given)


def _check_writable(folder: Path, option: str, given: Path) -> None:
    """Fails naming `option` (`given`) where `folder`, or the nearest of its parents that exists (where it
    would be made), cannot be written: a read-only disk, a folder of another user's."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _fail(f"{option} {given}: {existing} cannot be written to")


def _check_out_folder(folder: Path, option: str) -> None:
    """Fails naming `option` unless `folder` could be made and written, without making it: a command that
    fails on a later argument leaves nothing behind."""
    if (problem := _folder_problem(folder)) is not None:
        raise _fail(f"{option} {folder}: {problem}")
    _check_writable(folder, option, folder)


def _folder_problem(folder: Path) -> str | None:
    """Why `folder` cannot be a folder (a file or a dangling link where it or a parent would be), or None."""
    try:
        blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    except OSError as error:  # a name too long, a folder on the way that may not be searched
        return error.strerror or str(error)
    dangling = next((p for p in (folder, *folder.parents) if _dangling(p)), None)
    return (f"{blocking} is a file, not a folder" if blocking is not None else
            f"{dangling} {_DANGLING}" if dangling is not None else None)


def _warn_if_busy() -> None:
    """Warns when other work keeps this machine's cores busy: timings taken then are not the model's own."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > cores:
        typer.echo(f"Warning: the load average is {load:.1f} on {_counted(cores, 'core')} this process may use: "
                   "other work shares the CPU, so these times are not the model's alone (its ratio to PyTorch, "
                   "timed alike, holds better)", err=True)


def _warn_if_unfinished(model: Path) -> None:
    """Warns when `model` is the checkpoint of a training stage that has not finished (interrupted, or
    still running): a trainer state without the train_config.json a stage writes at its end."""
    if model.is_dir() and (model / "trainer_state.pt").is_file() and not (model / "train_config.json").is_file():
        typer.echo(f"Warning: {model} is the checkpoint of an unfinished training stage (its last finished epoch): "
                   "`dynseg train --resume` with the run's options finishes it", err=True)


def _torch_or_fail(what: str) -> None:
    try:
        import torch  # noqa: F401
    except ImportError as error:
        raise _fail(needs_trainer(what, error)) from error


_DATASET_HELP = "synthetic (built in, the default), voc, sbd, coco or cityscapes."
_ROOT_HELP = ("Folder of an on-disk dataset: VOCdevkit (or VOC2012), SBD's dataset/, the COCO folder, "
              "the Cityscapes folder.")
_DETECTIONS_HELP = ("Detections as a COCO results JSON file (image_id, category_id, bbox [x, y, w, h], score); "
                    "default: simulated from the ground truth.")


def _open_data(command: str, dataset: str, data_root: Optional[Path], split: Optional[str],
               detections: Optional[Path], **synthetic):
    """The dataset the options name, with the file's detections attached; one-line errors naming the options."""
    from dynseg.trainer.data.sources import DEFAULT_SPLITS, open_dataset, with_detections

    _check_dataset(dataset)
    if dataset == "synthetic" and (data_root is not None or split is not None):
        raise typer.BadParameter("the synthetic dataset is generated: give --dataset voc, sbd, coco or "
                                 "cityscapes to read one from disk", param_hint="--data-root / --split")
    height, width = synthetic["image_size"]
    low, high = defaults.MIN_IMAGE_SIDE, defaults.MAX_IMAGE_SIDE  # a synthetic scene's sides
    if not (low <= height <= high and low <= width <= high):
        raise typer.BadParameter(f"{height} {width}: each side must be in {low}..{high}",
                                 param_hint="--image-size")
    if dataset != "synthetic" and data_root is None:
        raise typer.BadParameter(f"--dataset {dataset} needs --data-root, the folder that holds it",
                                 param_hint="--data-root")
    split = split or DEFAULT_SPLITS[command].get(dataset, "train")
    try:
        data = open_dataset(dataset, root=data_root, split=split, **synthetic)
    except (DynsegError, OSError) as error:
        where = "" if dataset == "synthetic" else f" from --data-root {data_root} (--split {split})"
        raise _fail(f"cannot read --dataset {dataset}{where}: {error}") from error
    if detections is None:
        return data
    try:
        return with_detections(data, detections)
    except (DynsegError, OSError) as error:
        raise _fail(f"--detections {detections}: {error}") from error


def _given(context: typer.Context, *names: str) -> list[str]:
    """The options among `names` (parameter names) that the command line gave, as --option."""
    return ["--" + name.replace("_", "-") for name in names
            if (source := context.get_parameter_source(name)) is not None and source.name == "COMMANDLINE"]


def _choice(value: str, choices: Sequence[str], option: str) -> None:
    """Refuses `value` of `option` unless it is one of `choices` (checked here rather than by typer's
    Choice, so that a choice that needs torch is checked only once torch is known to be there)."""
    if value not in choices:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}", param_hint=option)


def _check_dataset(dataset: str) -> None:
    from dynseg.trainer.data.sources import DATASETS

    _choice(dataset, DATASETS, "--dataset")


def _refuse_synthetic_options(context: typer.Context, dataset: str, source: str | None = None) -> None:
    """--images and --image-size shape the generated scenes: an on-disk dataset would drop them silently.
    `source` says where the dataset came from when --dataset did not name it."""
    _check_dataset(dataset)  # first: an unknown name is the mistake, not the options that go with it
    given = _given(context, "images", "image_size")
    if dataset != "synthetic" and given:
        named = source or f"--dataset {dataset}"
        raise typer.BadParameter(f"options of the synthetic scenes ({' and '.join(given)}) given for {named}, "
                                 "which has its own images: leave them out", param_hint=" / ".join(given))


def _split_of(data) -> Optional[str]:
    """An on-disk dataset's split, with detections attached or as a subset; None for synthetic scenes."""
    return getattr(getattr(data, "dataset", data), "split", None)


def _training_data(dataset: str, seed: int, image_size: tuple[int, int], data) -> dict:
    """What `dynseg eval` holds out from: the synthetic scenes' seed and size, or an on-disk split."""
    if dataset == "synthetic":
        return {"dataset": dataset, "seed": seed, "image_size": image_size}
    return {"dataset": dataset, "seed": seed, "split": _split_of(data)}


def _describe(data, dataset: str, detections: Optional[Path]) -> str:
    split = _split_of(data)
    what = _counted(len(data), f"{dataset} image") + (f" (split {split})" if split else "")
    return what + (f", detections from {detections}" if detections else ", simulated detections")


@app.command(cls=_Command)
def train(
    context: typer.Context,
    out: Path = typer.Option(..., "--out", file_okay=False, help="Folder for checkpoints and logs."),
    dataset: str = typer.Option("synthetic", "--dataset", help=_DATASET_HELP),
    data_root: Optional[Path] = typer.Option(None, "--data-root", exists=True, file_okay=False, help=_ROOT_HELP),
    split: Optional[str] = typer.Option(None, "--split", help="Split to train on (default: train; COCO: train2017)."),
    detections: Optional[Path] = typer.Option(None, "--detections", exists=True, dir_okay=False,
                                              help=_DETECTIONS_HELP),
    backbone: str = typer.Option("resnet18", "--backbone", help="resnet18, resnet50, resnet101 or vgg16_fcn8s."),
    pretrained: Optional[Path] = typer.Option(None, "--pretrained", exists=True, dir_okay=False,
                                              help="torchvision ImageNet weights for the backbone."),
    images: int = typer.Option(defaults.TRAIN_IMAGES, "--images", min=1, max=defaults.MAX_IMAGES,
                              help="Synthetic training images."),
    image_size: tuple[int, int] = typer.Option(defaults.IMAGE_SIZE, "--image-size", metavar="H W",
                                                  help="Synthetic images' height and width."),
    semantic_steps: int = typer.Option(defaults.SEMANTIC_STEPS, "--semantic-steps", min=0, help="Stage 1 steps."),
    instance_steps: int = typer.Option(defaults.INSTANCE_STEPS, "--instance-steps", min=0, help="Stage 2 steps."),
    mode: str = typer.Option("piecewise", "--mode", help="Stage 2: piecewise (semantic frozen) or end-to-end."),
    learning_rate: float = typer.Option(defaults.LEARNING_RATE, "--lr", help="Stage 1 learning rate (stage 2 uses a "
                                        f"{defaults.INSTANCE_LR_DIVISOR}th)."),
    held_out_images: int = typer.Option(
        0, "--held-out-images", min=0, max=defaults.MAX_IMAGES,
        help="Score stage 2 after every epoch on this many held-out images (synthetic: seed + 1; on disk: the "
             "first of --held-out-split), with simulated detections; 0: no per-epoch evaluation."),
    held_out_split: Optional[str] = typer.Option(
        None, "--held-out-split", help="On-disk split for --held-out-images (default: val; COCO: val2017)."),
    seed: int = typer.Option(0, "--seed", min=0, max=defaults.MAX_SEED,
                             help="Seed of the data, the detections and the initialisation."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out from each stage's "
                                "last epoch's checkpoint (give the run's other options again)."),
) -> None:
    """Train the network: stage 1 semantic, stage 2 instance (synthetic scenes unless --dataset names another).

    Writes model.safetensors and model.json (the final model), semantic/ (stage 1's checkpoint),
    log.jsonl (every step of stage 2; stage 1's in semantic/) and epochs.jsonl (every epoch: loss, lr,
    images/s, held-out metrics).
    """
    _torch_or_fail("dynseg train")
    _choice(mode, ("piecewise", "end-to-end"), "--mode")
    if not (math.isfinite(learning_rate) and learning_rate >= 0):  # click's range lets NaN through, misnamed
        raise typer.BadParameter(f"must be a finite number >= 0, got {learning_rate}", param_hint="--lr")
    from dynseg.trainer.backbones import BackboneName

    _choice(backbone, get_args(BackboneName), "--backbone")  # before the data opens
    _refuse_synthetic_options(context, dataset)
    _check_out_folder(out / "semantic", "--out")  # stage 1's checkpoint, before the data and network are made
    if semantic_steps == instance_steps == 0:
        typer.echo("Warning: --semantic-steps 0 and --instance-steps 0: the checkpoint will hold the untrained "
                   "network", err=True)
    if held_out_split is not None and (dataset == "synthetic" or not held_out_images):
        raise typer.BadParameter("names an on-disk split to score with --held-out-images N: give --dataset and "
                                 "--held-out-images too", param_hint="--held-out-split")
    import torch

    from dynseg.trainer.model import ModelConfig, build_model
    from dynseg.trainer.train import TrainConfig, fit

    torch.manual_seed(seed)
    data = _open_data("train", dataset, data_root, split, detections, size=images, image_size=image_size, seed=seed)
    held_out = None
    if held_out_images:
        held_out = _open_data("eval", dataset, data_root, held_out_split, None, size=held_out_images,
                              image_size=image_size, num_classes=len(data.class_names) - 1, seed=seed + 1)
        held_out = torch.utils.data.Subset(held_out, range(min(held_out_images, len(held_out))))
        if _split_of(data) is not None and _split_of(held_out) == _split_of(data):
            typer.echo(f"Warning: the held-out images come from the training split {_split_of(data)}: their "
                       "metrics score images the network is trained on (--held-out-split names another)", err=True)
    try:
        config = ModelConfig(backbone=cast(BackboneName, backbone), class_names=tuple(data.class_names[1:]))
        model = build_model(config, pretrained=pretrained)
    except ValueError as error:
        raise _fail(str(error)) from error
    typer.echo(f"training on {_describe(data, dataset, detections)}")
    try:
        fit(model, data, out_dir=out,
            semantic=TrainConfig(stage="semantic", steps=semantic_steps, learning_rate=learning_rate, seed=seed),
            instance=TrainConfig(stage="instance", mode=cast("TrainMode", mode), steps=instance_steps,
                                 learning_rate=learning_rate / defaults.INSTANCE_LR_DIVISOR, seed=seed),
            printer=typer.echo, live=sys.stdout.isatty(), held_out=held_out, eval_seed=seed + 1,
            training_data=_training_data(dataset, seed, image_size, data), resume=resume)
    except (DynsegError, OSError) as error:  # an annotation or image the dataset could not read
        raise _fail(str(error)) from error
    except KeyboardInterrupt:
        saved = [folder for folder in (out / "semantic", out) if (folder / "trainer_state.pt").is_file()]
        held = (f"{' and '.join(map(str, saved))} hold{'s' if len(saved) == 1 else ''} the checkpoint of each started "
                "stage's last finished epoch" if saved else "no stage finished an epoch, so nothing was saved")
        typer.echo(f"\ninterrupted: {held}; give the same command with --resume to continue", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"wrote {out}/model.safetensors, {out}/model.json and {out}/epochs.jsonl; next: dynseg eval {out}")


@app.command("eval", cls=_Command)
def evaluate_command(
    context: typer.Context,
    model: Path = typer.Argument(..., exists=True, metavar="MODEL",
                                 help="A folder written by dynseg train, or an exported model: .onnx, or a TensorRT "
                                      ".engine (with --device cuda)."),
    dataset: Optional[str] = typer.Option(
        None, "--dataset", help="synthetic (built in), voc, sbd, coco or cityscapes; default: the dataset the "
                                "checkpoint was trained on, else synthetic."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", exists=True, file_okay=False, help=_ROOT_HELP),
    split: Optional[str] = typer.Option(None, "--split", help="Split to score (default: val; COCO: val2017)."),
    detections: Optional[Path] = typer.Option(None, "--detections", exists=True, dir_okay=False,
                                              help=_DETECTIONS_HELP),
    images: int = typer.Option(50, "--images", min=1, max=defaults.MAX_IMAGES, help="Held-out synthetic images."),
    image_size: Optional[tuple[int, int]] = typer.Option(
        None, "--image-size", metavar="H W",
        help="Synthetic images' height and width (default: training's, else 96 120)."),
    seed: Optional[int] = typer.Option(
        None, "--seed", min=0, max=defaults.MAX_SEED,
        help="Seed of the held-out synthetic images and simulated detections (default: training's seed + 1, else 1)."),
    protocol: str = typer.Option("original", "--protocol", help="original (the released code) or voc."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N (a TensorRT engine: cuda)."),
    out: Optional[Path] = typer.Option(
        None, "--out", file_okay=False,
        help="Where to write metrics.json/.md (default: the checkpoint's folder; for a model file, "
             "<its folder>/<its name without suffix>_eval)."),
) -> None:
    """Evaluate a checkpoint or an exported model on held-out images of the dataset it was trained on (or
    --dataset's)."""
    _torch_or_fail("dynseg eval")

    from dynseg.trainer.checkpoint import TRAINING_DATA, read_training_data
    from dynseg.trainer.evaluation import PROTOCOLS, metrics_table, write_metrics

    from .commands import evaluate as evaluation

    _choice(protocol, PROTOCOLS, "--protocol")
    recorded = TRAINING_DATA if model.is_dir() else "its metadata"
    try:
        trained_on = read_training_data(model) if model.is_dir() else evaluation.training_data_of(model)
    except DynsegError as error:
        raise _fail(str(error)) from error
    defaulted, source = dataset is None, None
    if dataset is None:  # a model is scored on its own dataset unless told otherwise
        dataset = trained_on["dataset"] if trained_on else "synthetic"
        source = f"{dataset}, the dataset {model} was trained on ({recorded})" if trained_on else None
        if dataset != "synthetic" and data_root is None:
            raise typer.BadParameter(f"{model} was trained on {dataset} ({recorded}): give its folder, "
                                     "or --dataset to score it on another", param_hint="--data-root")
    _refuse_synthetic_options(context, dataset, source)
    if seed is None:
        seed = trained_on["seed"] + 1 if trained_on else 1
    if image_size is None:
        image_size = tuple(trained_on["image_size"]) if trained_on and "image_size" in trained_on else \
            defaults.IMAGE_SIZE
    if dataset == "synthetic" and trained_on and trained_on["dataset"] == "synthetic" and seed == trained_on["seed"]:
        typer.echo(f"Warning: --seed {seed} is the seed {model} was trained with: these are its training scenes, "
                   "not held-out ones", err=True)
    named = f"--dataset {dataset}" if not defaulted else source or f"the default dataset, {dataset}"
    segmenter = _segmenter(model, "auto", device)  # a folder that is no checkpoint fails here, before the note
    _warn_if_unfinished(model)
    if defaulted and trained_on is None:  # an export, or a checkpoint from before the record
        typer.echo(f"Note: {model} records no training data: scoring synthetic scenes of seed {seed} at "
                   f"{image_size[0]}x{image_size[1]}; --dataset, --seed and --image-size choose its held-out data",
                   err=True)
    class_names = segmenter.class_names
    if dataset == "synthetic":  # SyntheticScenes' own range check would name its num_classes argument instead
        from dynseg.trainer.data.synthetic import MAX_CLASSES
        if len(class_names) > MAX_CLASSES:
            raise _fail(f"the model has {len(class_names)} classes, {named} has at most {MAX_CLASSES}")
    data = _open_data("eval", dataset, data_root, split, detections, size=images, image_size=image_size,
                      num_classes=len(class_names), seed=seed)
    if len(data.class_names) - 1 != len(class_names):
        raise _fail(f"the model has {len(class_names)} classes, {named} has {len(data.class_names) - 1}")
    if tuple(data.class_names[1:]) != tuple(class_names):  # the same count is not the same classes
        raise _fail(f"the model's classes {list(class_names)} are not {named}'s {list(data.class_names[1:])}")
    trained_split = trained_on.get("split") if trained_on and trained_on["dataset"] == dataset else None
    if trained_split is not None and _split_of(data) == trained_split:
        typer.echo(f"Warning: split {_split_of(data)} is the split {model} was trained on: these are its training "
                   "images, not held-out ones", err=True)
    target = out or (model if model.is_dir() else model.parent / f"{model.stem}_eval")
    _make_folder(target, "--out" if out else "the default output folder", target)
    try:
        metrics, trimmed = evaluation.run(segmenter, data, seed=seed, protocol=protocol,
                                          progress=lambda total: _item_progress("eval", total))
    except (DynsegError, OSError) as error:
        raise _fail(str(error)) from error
    if trimmed:
        typer.echo(f"Warning: {_counted(trimmed, 'image')} had more detections than {model} takes "
                   f"({segmenter.max_detections}): each was scored with its {segmenter.max_detections} most "
                   "confident", err=True)
    if all(math.isnan(v) for v in metrics["ap_r"].values()):  # AP^r is undefined only without ground truth
        typer.echo("Warning: these images hold no ground-truth instance: every metric is undefined (NaN, null in "
                   "metrics.json)", err=True)
    seeded = f" (seed {seed})" if dataset == "synthetic" else ""
    scored = f"{model}: {_describe(data, dataset, detections)}{seeded}, protocol {protocol}, values in %"
    typer.echo(f"{scored}\n{metrics_table(metrics)}")
    as_json, as_table = write_metrics(target, metrics, scored)
    typer.echo(f"wrote {as_json} and {as_table}")


# ------------------------------------------------------------------------------------------ deployment


def _check_device(device: str) -> None:
    """A malformed --device, named as the option before any model loads."""
    from .inputs import cuda_index

    try:
        cuda_index(device)
    except InvalidArgumentError as error:
        raise typer.BadParameter(str(error), param_hint="--device") from None


def _segmenter(model: Path, backend: str, device: str):
    from .segmenter import BACKENDS, Segmenter

    _check_device(device)
    _choice(backend, BACKENDS, "--backend")
    try:
        return Segmenter(model, backend=cast("Backend", backend), device=device)
    except DynsegError as error:
        raise _fail(str(error)) from error


_HUGE = 10**18  # above every count and size dynseg takes


def _count(text: str) -> int | None:
    """The count `text` writes in the digits 0-9 (str.isdigit alone admits '²'), else None. One of more
    than 18 digits reads as _HUGE: int() refuses more than 4300 digits with a bare ValueError."""
    if not (text.isascii() and text.isdigit()):
        return None
    return int(text) if len(text.lstrip("0")) <= 18 else _HUGE


def _size(text: str, option: str, minimum: int = 1, maximum: Optional[int] = None) -> tuple[int, int]:
    """'480x640' -> (480, 640): an image size as height x width, each in minimum..maximum."""
    height_text, _, width_text = text.strip().lower().partition("x")
    height, width = _count(height_text), _count(width_text)
    if height is None or width is None or min(height, width) < minimum:
        raise typer.BadParameter(f"{text!r:.80} is not HEIGHTxWIDTH (e.g. 512x512, each at least {minimum})",
                                 param_hint=option)
    if maximum is not None and max(height, width) > maximum:
        raise typer.BadParameter(f"{text!r:.80}: each side must be in {minimum}..{maximum}", param_hint=option)
    return height, width


def _at_most(size: tuple[int, int], bound: tuple[int, int]) -> tuple[int, int]:
    return min(size[0], bound[0]), min(size[1], bound[1])


def _at_least(size: tuple[int, int], bound: tuple[int, int]) -> tuple[int, int]:
    return max(size[0], bound[0]), max(size[1], bound[1])


def _size_text(size: tuple[int, int]) -> str:
    """(480, 640) -> '480x640', as _size reads it."""
    return f"{size[0]}x{size[1]}"


def _engine_sizes(min_size: str | None, opt_size: str | None, max_size: str) -> tuple[tuple[int, int], ...]:
    """An engine profile's (min, opt, max) image sizes from export's options: unless given, the opt size
    lies between the others as a profile needs, and the min size below it."""
    largest = _size(max_size, "--max-size")
    given_min = _size(min_size, "--min-size") if min_size is not None else None
    optimum = _size(opt_size, "--opt-size") if opt_size is not None else \
        _at_least(_at_most(DEFAULT_ENGINE_SIZES[1], largest), given_min or (1, 1))
    return given_min or _at_most(DEFAULT_ENGINE_SIZES[0], optimum), optimum, largest


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    # bench makes each image in memory, as synthetic training scenes are: the same bound
    return [_size(part, "--sizes", minimum=8, maximum=defaults.MAX_IMAGE_SIDE) for part in text.split(",")]


def _parse_counts(text: str) -> list[int]:
    found = [_count(p.strip()) for p in text.split(",")]
    counts = [count for count in found if count is not None]
    if len(counts) != len(found):
        raise typer.BadParameter(f"{text!r:.80} is not a comma-separated list of counts >= 0 (e.g. 0,1,10,50)",
                                 param_hint="--detections")
    repeated = sorted({count for count in counts if counts.count(count) > 1})
    if repeated:
        raise typer.BadParameter(f"{text!r:.80} gives {', '.join(map(str, repeated))} more than once: each count "
                                 "is one case", param_hint="--detections")
    return counts


@app.command(cls=_Command)
def export(
    context: typer.Context,
    checkpoint: Path = typer.Argument(..., exists=True, file_okay=False, help="Folder written by dynseg train."),
    kind: str = typer.Option("onnx", "--format", help="onnx, or engine (TensorRT: needs TensorRT and a GPU)."),
    out: Path = typer.Option(..., "--out", dir_okay=False, help="The file to write, e.g. model.onnx or model.engine."),
    max_detections: int = typer.Option(
        DEFAULT_MAX_DETECTIONS, "--max-detections", min=1, max=MAX_DETECTIONS,
        help="Most detections per image the runtime accepts (the engine profile's max)."),
    min_detections: int = typer.Option(DEFAULT_ENGINE_DETECTIONS[0], "--min-detections", min=0,
                                       help="engine: the profile's smallest D."),
    opt_detections: Optional[int] = typer.Option(
        None, "--opt-detections", min=0,
        help=f"engine: the D TensorRT tunes for (default: {DEFAULT_ENGINE_DETECTIONS[1]}, at most the max)."),
    min_size: Optional[str] = typer.Option(
        None, "--min-size",
        help=f"engine: the smallest image, HEIGHTxWIDTH (default: {_size_text(DEFAULT_ENGINE_SIZES[0])}, at most "
             "the opt size)."),
    opt_size: Optional[str] = typer.Option(
        None, "--opt-size",
        help=f"engine: the image size TensorRT tunes for (default: {_size_text(DEFAULT_ENGINE_SIZES[1])}, within "
             "the min and max sizes)."),
    max_size: str = typer.Option(_size_text(DEFAULT_ENGINE_SIZES[2]), "--max-size",
                                 help="engine: the largest image, HEIGHTxWIDTH."),
    fp16: bool = typer.Option(False, "--fp16", help="engine: reduced precision outside the CRF (TensorRT 10)."),
    workspace: Optional[int] = typer.Option(None, "--workspace", min=1, help="engine: builder workspace limit, bytes."),
) -> None:
    """Export a checkpoint for deployment: ONNX with the dynseg::MeanFieldCRF op (docs/ops.md), or a
    TensorRT engine built from it with the dynseg plugin (docs/tensorrt.md)."""
    _choice(kind, ("onnx", "engine"), "--format")
    engine_only = ("min_detections", "opt_detections", "min_size", "opt_size", "max_size", "fp16", "workspace")
    given = _given(context, *engine_only)
    if kind == "onnx" and given:  # an ONNX file has no profile: the options would be dropped silently
        raise typer.BadParameter(f"options of a TensorRT engine ({', '.join(given)}) given for --format onnx: give "
                                 "--format engine, or leave them out",
                                 param_hint="--format")
    if kind == "onnx" and out.suffix != ".onnx":  # Segmenter tells a model's kind by its suffix
        raise typer.BadParameter(f"an ONNX export is a .onnx file (an engine, --format engine, a .engine), got {out}",
                                 param_hint="--out")
    sizes = _engine_sizes(min_size, opt_size, max_size)
    if kind == "engine":  # before the export, so a bad profile costs no export
        if out.suffix not in ENGINE_SUFFIXES:
            raise typer.BadParameter(f"an engine is a .engine or .plan file (the .onnx goes beside it), got {out}",
                                     param_hint="--out")
        from dynseg.export.engine import (EngineError, build_engine, default_detections, import_tensorrt,
                                          make_profile, plugin_library_path)

        # unless given, the opt D lies between the others as a profile needs
        opt = opt_detections if opt_detections is not None else \
            max(min_detections, default_detections(max_detections)[1])
        detections = (min_detections, opt, max_detections)

        # the sizes on their own, then the detections with those sizes: each error names its own options
        for which, checked_detections in (("size", (0, 0, 0)), ("detections", detections)):
            try:
                make_profile(checked_detections, sizes, max_detections=max_detections)
            except InvalidArgumentError as error:
                raise typer.BadParameter(str(error), param_hint=f"--min-{which} / --opt-{which} / --max-{which}")
        try:  # nor does a machine without TensorRT or the plugin (the export would overwrite the .onnx beside out)
            import_tensorrt()
            plugin_library_path()
        except EngineError as error:
            raise _fail(str(error)) from error
    _torch_or_fail("dynseg export")
    from dynseg.export.onnx import export_onnx
    from dynseg.trainer.checkpoint import load_checkpoint, read_training_data

    try:
        model = load_checkpoint(checkpoint)
        trained_on = read_training_data(checkpoint)  # recorded in the export, for `dynseg eval` of it
    except (FileNotFoundError, DynsegError) as error:
        raise _fail(str(error)) from error
    _warn_if_unfinished(checkpoint)
    if kind == "engine":  # the sizes again with the model's label count, still before the export
        try:
            make_profile(detections, sizes, max_detections=max_detections, labels=len(model.config.class_names) + 1)
        except InvalidArgumentError as error:
            raise typer.BadParameter(str(error), param_hint="--max-size")
    _make_folder(out.parent, "--out", out)
    onnx_path = out if kind == "onnx" else out.with_suffix(".onnx")
    try:
        path = export_onnx(model, onnx_path, max_detections=max_detections, training_data=trained_on)
    except DynsegError as error:
        raise _fail(f"cannot export {checkpoint}: {error}") from error
    except OSError as error:  # a full disk, say: the export wrote nothing there
        raise _fail(f"cannot write {onnx_path}: {error.strerror or error}") from error
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {len(model.config.class_names)} classes, "
               f"up to {max_detections} detections)")
    if kind == "onnx":
        typer.echo(f"next: dynseg validate {path} --checkpoint {checkpoint}")
        return
    try:
        engine = build_engine(path, out, fp16=fp16, detections=detections, sizes=sizes, workspace=workspace)
    except (EngineError, InvalidArgumentError) as error:
        raise _fail(str(error)) from error
    typer.echo(f"wrote {engine} and its sidecar {engine}.json")


@app.command(cls=_Command)
def infer(
    model: Path = typer.Argument(..., help="An exported .onnx model, a checkpoint folder, or a TensorRT .engine."),
    images: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="Image files to segment."),
    detections: Path = typer.Option(..., "--detections", exists=True, dir_okay=False,
                                    help="COCO results JSON; image_id = the image file's stem (or its number)."),
    out: Path = typer.Option(..., "--out", file_okay=False, help="Folder for the PNGs and results.json."),
    backend: str = typer.Option("auto", "--backend",
                                help="auto (by MODEL: a folder torch, .engine or .plan tensorrt, else onnxruntime), "
                                     "onnxruntime, torch or tensorrt."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    keep_top: Optional[int] = typer.Option(None, "--keep-top", min=0,
                                           help="Keep each image's N most confident detections (default: all; an "
                                                "image over the model's limit is an error)."),
) -> None:
    """Segment images given their detections: per image {stem}_overlay.png and {stem}_instances.png
    (16-bit, pixel = instance id, 0 = background), and results.json (COCO results) for all."""
    from .commands import infer as job

    _check_out_folder(out, "--out")  # before the model loads; made by the job
    segmenter = _segmenter(model, backend, device)
    if keep_top is not None and keep_top > segmenter.max_detections:  # the remedy for too many is this option
        raise typer.BadParameter(f"{keep_top} is above this model's limit of {segmenter.max_detections} detections "
                                 "per image", param_hint="'--keep-top'")
    try:
        summary = job.run(segmenter, images, detections, out, keep_top=keep_top,
                          progress=lambda total: _item_progress("infer", total))
    except DynsegError as error:
        raise _fail(str(error)) from error
    typer.echo(f"wrote {_counted(summary.images, 'overlay')} and {_counted(summary.images, 'instance map')} to "
               f"{out}/ and {_counted(summary.instances, 'instance')} to {summary.results}; "
               f"{_counted(summary.dropped, 'detection')} got no instance")


_NO_INSTANCES = ("note: the checkpoint found no instance in any image (column N), so the instance checks "
                 "compared background only")


@app.command(cls=_Command, help=(
    "Parity of the exported model (onnxruntime) with its checkpoint (PyTorch): the CRF nodes' attributes and "
    "weights equal the checkpoint's; on the images, max |Δ| of the instance probabilities "
    f"(<= {parity.PROBABILITY_ATOL:g}) and of the semantic ones (<= {parity.SEMANTIC_ATOL:g}), argmax agreement "
    f"on settled pixels (>= {parity.MIN_AGREEMENT:.1%}), per-instance mask IoU (>= {parity.MIN_IOU:g}). Exit "
    "status 1 when any check fails."))
def validate(
    model: Path = typer.Argument(..., help="The exported .onnx model."),
    checkpoint: Path = typer.Option(..., "--checkpoint", exists=True, file_okay=False,
                                    help="The checkpoint folder it was exported from."),
    images: Optional[list[Path]] = typer.Option(None, "--images", exists=True, dir_okay=False,
                                                help="Image files (repeat the option); default: the sample photos."),
    detections: Optional[Path] = typer.Option(None, "--detections", exists=True, dir_okay=False,
                                              help="COCO results JSON for --images; default: generated boxes."),
    device: str = typer.Option("cpu", "--device", help="Where the exported model runs: cpu, cuda or cuda:N "
                                                       "(PyTorch, the reference, runs on the CPU)."),
) -> None:
    _torch_or_fail("dynseg validate")
    if detections is not None and not images:
        raise typer.BadParameter("--detections needs --images, the files it names", param_hint="--detections")
    _check_device(device)
    try:
        report = parity.validate_export(
            model, checkpoint, images or (), detections, device,
            progress=lambda total: _item_progress("validate", total))
    except DynsegError as error:
        raise _fail(str(error)) from error
    typer.echo(f"{model} (onnxruntime, {device}) vs {checkpoint} (PyTorch, cpu): the CRF nodes' attributes and "
               f"weights are the checkpoint's\n{report.table()}")
    if not report:
        failed = [str(c) for c in report.worst() if not c]
        raise _fail("parity check failed: " + "; ".join(failed))
    typer.echo("parity: ok (" + "; ".join(str(c) for c in report.worst()) + ")")
    if not report.exercised_instances():
        typer.echo(_NO_INSTANCES + ": pass --images (and --detections) from the model's own domain")


@app.command(cls=_Command)
def bench(
    model: Path = typer.Argument(..., help="The exported .onnx model."),
    sizes: str = typer.Option("256x256,512x512", "--sizes", help="Image sizes HxW, comma-separated, each side "
                                                                 f"8..{defaults.MAX_IMAGE_SIDE}."),
    detections: Optional[str] = typer.Option(
        None, "--detections", help="Detection counts D, comma-separated (default: "
                                   f"{','.join(map(str, BENCH_DETECTIONS))}, each at most the model's limit)."),
    repeats: int = typer.Option(10, "--repeats", min=1, help="Timed calls per case (after one warm-up call)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", exists=True, file_okay=False,
                                              help="Also time this checkpoint on PyTorch, same device and inputs."),
    json_out: Optional[Path] = typer.Option(None, "--json", dir_okay=False, help="Also write the rows as JSON."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N (onnxruntime-gpu for the model)."),
) -> None:
    """Latency (p50/p90/p99) and throughput of the exported model over image sizes and D, split into
    network, CRFs and post-processing; --checkpoint times PyTorch on the same device and inputs."""
    from .commands import bench as job

    parsed_sizes = _parse_sizes(sizes)
    counts = _parse_counts(detections) if detections is not None else None
    _check_device(device)
    _warn_if_busy()
    if checkpoint is not None:
        _torch_or_fail("dynseg bench --checkpoint")
    created = False
    if json_out is not None:  # before the timings, so an unwritable --json fails at once
        if _dangling(json_out):  # touch() below would create the link's target
            raise _fail(f"--json {json_out} {_DANGLING}")
        _make_folder(json_out.parent, "--json", json_out)
        if json_out.exists() and not json_out.is_file():
            raise _fail(f"--json {json_out} is a pipe or device, not a file")
        inputs = [model, *(sorted(checkpoint.iterdir()) if checkpoint is not None else [])]
        if any(json_out.resolve() == path.resolve() for path in inputs):
            raise _fail(f"--json {json_out} is one of the files being timed: give another path")
        try:
            created = not json_out.exists()
            json_out.touch()
        except OSError as error:
            raise _fail(f"--json {json_out}: {error.strerror or error}") from error
    try:
        rows = job.run(model, sizes=parsed_sizes, detections=counts, repeats=repeats, checkpoint=checkpoint,
                       device=device,
                       on_row=lambda r: typer.echo(f"[bench] {r.backend} {r.height}x{r.width} D={r.detections}: "
                                                   f"p50 {r.p50_ms:.1f} ms"))
        typer.echo(job.table(rows))
        if json_out is not None:
            write_text_whole(json_out, json.dumps(job.as_json(rows), indent=2))
    except BaseException as error:
        if created and json_out is not None:  # no empty file left behind to pass for results
            json_out.unlink(missing_ok=True)
        if isinstance(error, DynsegError):
            raise _fail(str(error)) from error
        raise
    if json_out is not None:
        typer.echo(f"wrote {json_out}")


@app.command(cls=_Command)
def quickstart(
    out: Path = typer.Option(..., "--out", file_okay=False,
                             help="Folder for everything it makes (an earlier run's files there are replaced)."),
    steps: int = typer.Option(quickstart_job.DEFAULT_STEPS, "--steps", min=2,
                              help="Training steps in all (6:1 semantic:instance); the default took 7 to 19 min "
                                   "on 2-core VMs (docs/deploy.md)."),
    seed: int = typer.Option(0, "--seed", min=0, max=defaults.MAX_SEED,
                             help="Seed of the data, detections and initialisation."),
) -> None:
    """Train a small model on synthetic scenes, evaluate, export ONNX, validate parity and segment sample
    images, all into --out; then print what it made and what to run next."""
    _torch_or_fail("dynseg quickstart")
    _make_folder(out, "--out", out)
    try:
        summary = quickstart_job.run(out, steps=steps, seed=seed, printer=typer.echo, live=sys.stdout.isatty())
    except DynsegError as error:
        raise _fail(str(error)) from error
    metrics = summary.metrics
    typer.echo(f"\n{quickstart_job.HELD_OUT_IMAGES} held-out synthetic scenes: AP^r at 0.5 "
               f"{100 * metrics['ap_r']['0.5']:.1f} %, "
               f"AP^r_vol {100 * metrics['ap_r_vol']:.1f} %, PQ {100 * metrics['pq']:.1f} %")
    typer.echo("parity onnxruntime vs PyTorch: " + ("ok" if summary.parity else "FAILED") + " ("
               + "; ".join(str(c) for c in summary.parity.worst()) + ")")
    if not summary.parity.exercised_instances():  # a very short run (--steps) that learned no instance yet
        typer.echo(_NO_INSTANCES + ": train longer (--steps)")
    typer.echo("made:\n" + "\n".join(f"  {path}" for path in summary.files))
    model, ckpt, detections = summary.model, summary.checkpoint, out / "detections.json"
    images = " ".join(str(path) for path in summary.images)
    typer.echo("next:\n"
               f"  dynseg infer {model} {images} --detections {detections} --out {out / 'infer'}\n"
               f"  dynseg validate {model} --checkpoint {ckpt} --detections {detections}"
               + "".join(f" --images {path}" for path in summary.images) + "\n"
               f"  dynseg eval {model} --images {quickstart_job.HELD_OUT_IMAGES}\n"
               f"  dynseg bench {model} --sizes 512x512 --detections 10 --checkpoint {ckpt}\n"
               f"  python -c \"from dynseg.sdk import Segmenter; print(Segmenter('{model}'))\"")
    if not summary.parity:
        raise typer.Exit(1)
