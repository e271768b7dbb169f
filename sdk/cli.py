"""The `dynseg` command line: parses and validates arguments, then delegates to the SDK.

Commands: `dynseg --version`, `dynseg --help`, `dynseg demo`. No work is done here; `demo` is
dynseg.sdk.demo.run. Errors dynseg raises on purpose print one line and exit with status 1.
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
    help="Dynamically Instantiated Network instance segmentation; for now, its dense CRF.",
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
    """Dynamically Instantiated Network instance segmentation; for now, its dense CRF."""


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
