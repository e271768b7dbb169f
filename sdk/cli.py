"""The `dynseg` command line: parses and validates arguments, then delegates to the SDK.

Commands: `dynseg --version`, `dynseg --help`, `dynseg demo` (dynseg.sdk.demo.run), and, with torch
installed, `dynseg train` and `dynseg eval` (dynseg.trainer.train.fit / predict and
dynseg.trainer.evaluation.evaluate). No work is done here. Errors dynseg raises on purpose print one
line and exit with status 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import DynsegError

__all__ = ["app"]

app = typer.Typer(
    name="dynseg",
    help="Dynamically Instantiated Network instance segmentation: the CRF demo, training and evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_line() -> str:
    from . import _native

    try:
        native = _native.native_version()
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
    """Dynamically Instantiated Network instance segmentation: the CRF demo, training and evaluation."""


@app.command()
def demo(
    out: Path = typer.Option(..., "--out", file_okay=False, help="Folder to write before_after.png into."),
    image: Optional[Path] = typer.Option(
        None, "--image", exists=True, dir_okay=False, readable=True,
        help="Photo to segment (default: the shipped 500x375 coffee photo).",
    ),
    iterations: int = typer.Option(5, "--iterations", min=0, help="Mean-field iterations."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads (default: all cores)."),
) -> None:
    """Clean up a blocky colour labelling of a photo with the dense CRF; save and time it."""
    from . import demo as demo_job

    try:
        result = demo_job.run(out, image=image, iterations=iterations, threads=threads)
    except DynsegError as error:
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(1) from error
    typer.echo(f"wrote {result['output']} (photo | labels before | labels after the CRF)")
    typer.echo(
        f"{result['image']}: {result['width']}x{result['height']} px, {result['labels']} labels, "
        f"{result['iterations']} iterations, {result['changed']:.1%} of pixels relabelled"
    )
    typer.echo(
        f"dense_crf: best of {result['runs']} = {result['best_ms']:.1f} ms "
        f"on {result['threads']} thread(s), lattice builds included"
    )


def _needs_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError as error:
        typer.echo('Error: training and evaluation need torch: pip install "dynseg[train]"', err=True)
        raise typer.Exit(1) from error


@app.command()
def train(
    out: Path = typer.Option(..., "--out", file_okay=False, help="Folder for checkpoints and logs."),
    backbone: str = typer.Option("resnet18", "--backbone", help="resnet18, resnet50, resnet101 or vgg16_fcn8s."),
    pretrained: Optional[Path] = typer.Option(None, "--pretrained", exists=True, dir_okay=False,
                                              help="torchvision ImageNet weights for the backbone."),
    images: int = typer.Option(400, "--images", min=1, help="Synthetic training images."),
    image_size: tuple[int, int] = typer.Option((96, 120), "--image-size", help="Height and width."),
    semantic_steps: int = typer.Option(600, "--semantic-steps", min=0, help="Stage 1 steps."),
    instance_steps: int = typer.Option(100, "--instance-steps", min=0, help="Stage 2 steps."),
    mode: str = typer.Option("piecewise", "--mode", help="Stage 2: piecewise (semantic frozen) or end-to-end."),
    learning_rate: float = typer.Option(0.02, "--lr", min=0.0, help="Stage 1 learning rate (stage 2 uses a 20th)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data, the detections and the initialisation."),
) -> None:
    """Train the network on the built-in synthetic dataset: stage 1 semantic, stage 2 instance."""
    _needs_torch()
    if mode not in ("piecewise", "end-to-end"):
        raise typer.BadParameter("must be piecewise or end-to-end", param_hint="--mode")
    import torch

    from dynseg.trainer.data import SyntheticScenes
    from dynseg.trainer.model import ModelConfig, build_model
    from dynseg.trainer.train import TrainConfig, fit

    torch.manual_seed(seed)
    data = SyntheticScenes(size=images, image_size=image_size, seed=seed)
    try:
        model = build_model(ModelConfig(backbone=backbone, class_names=tuple(data.class_names[1:])),
                            pretrained=pretrained)
    except ValueError as error:
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(1) from error
    fit(model, data, out_dir=out,
        semantic=TrainConfig(stage="semantic", steps=semantic_steps, learning_rate=learning_rate, seed=seed),
        instance=TrainConfig(stage="instance", mode=mode, steps=instance_steps, learning_rate=learning_rate / 20,
                             seed=seed),
        printer=typer.echo)
    typer.echo(f"wrote {out}/model.safetensors and {out}/model.json; next: dynseg eval {out}")


@app.command("eval")
def evaluate_command(
    checkpoint: Path = typer.Argument(..., exists=True, file_okay=False, help="Folder written by dynseg train."),
    images: int = typer.Option(50, "--images", min=1, help="Held-out synthetic images."),
    image_size: tuple[int, int] = typer.Option((96, 120), "--image-size", help="Height and width."),
    seed: int = typer.Option(1, "--seed", help="Seed of the held-out images (training used --seed 0)."),
    protocol: str = typer.Option("original", "--protocol", help="original (the released code) or voc."),
    out: Optional[Path] = typer.Option(None, "--out", file_okay=False, help="Where to write metrics.json/.md."),
) -> None:
    """Evaluate a checkpoint on held-out synthetic images with simulated detections."""
    _needs_torch()
    import json

    from dynseg.trainer.data import SyntheticScenes
    from dynseg.trainer.evaluation import evaluate
    from dynseg.trainer.train import load_checkpoint, predict

    try:
        model = load_checkpoint(checkpoint)
    except FileNotFoundError as error:
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(1) from error
    data = SyntheticScenes(size=images, image_size=image_size, num_classes=model.config.num_classes, seed=seed)
    predictions, ground_truths = predict(model, data, seed=seed)
    try:
        metrics = evaluate(predictions, ground_truths, num_classes=model.config.num_classes, protocol=protocol)
    except ValueError as error:
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(1) from error
    rows = [(f"AP^r at {t}", v) for t, v in metrics["ap_r"].items()]
    rows += [("AP^r_vol", metrics["ap_r_vol"]), ("Matching IoU", metrics["matching_iou"]), ("PQ", metrics["pq"]),
             ("COCO mask AP", metrics["coco_mask_ap"])]
    table = "| metric | value |\n| --- | ---: |\n" + "\n".join(f"| {name} | {100 * v:.1f} |" for name, v in rows)
    typer.echo(f"{checkpoint}: {images} synthetic images (seed {seed}), protocol {protocol}, values in %\n{table}")
    target = out or checkpoint
    target.mkdir(parents=True, exist_ok=True)
    (target / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (target / "metrics.md").write_text(table + "\n")
