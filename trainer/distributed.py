"""Data-parallel training over processes and machines: `torchrun` starts one process per GPU (or
several on a CPU), `train` wraps the step's loss in DistributedDataParallel (NCCL on GPUs, gloo on
CPUs).

Launch (every process runs the same command; torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*):

    torchrun --standalone --nproc_per_node 2 -m dynseg.trainer.distributed --out runs/ddp
    # two machines, 8 GPUs each, the same command on both with --node_rank 0 and 1:
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \
        --rdzv_endpoint HOST:29500 -m dynseg.trainer.distributed --out /shared/runs/ddp

Without torchrun's variables the same module trains in one process, like `dynseg train`.

What a step is with W processes (`train` documents the rest):
- stage 1: the global batch is `batch_size` images, process r takes positions `shard(batch_size, r, W)`
  (batch_size must be a multiple of W); stage 2: one image per process, so W images per step.
- Every image's index and augmentation come from a generator seeded by (seed, step, position in the
  global batch), so the union of the processes' images is what one process would draw for the same
  global batch, and no process needs another's random stream.
- BatchNorm normalises with each process's own images (torch's SyncBatchNorm refuses CPU tensors), and
  dropout draws its masks from each process's own generator, so stage 1 equals one process with the
  same global batch (up to float summation order) only with `TrainConfig.frozen_batch_norm` and no
  dropout; otherwise it is the usual DDP approximation.
- Rank 0 alone writes the log and the checkpoints (out_dir must be shared between machines for
  `resume`); every process returns the same log, whose losses are global means.
- Where rank 0 fails while writing (a full disk, an unwritable folder), every process stops with an
  error (`fail_together`), under any launcher: the others do not wait for it in their next collective.

Tested with gloo on CPUs (tests/trainer/test_distributed.py). The NCCL path has run in one process
only, under torchrun on one lent H200 (docs/benchmarks.md, stop 28): NCCL with several processes has not.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

from dynseg.sdk.commands import defaults
from dynseg.sdk.errors import DynsegError, InvalidArgumentError

__all__ = ["init_from_environment", "is_main", "rank", "world_size", "shard", "all_reduce", "fail_together", "shutdown",
           "main"]

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def init_from_environment() -> tuple[int, int]:
    """Joins the process group that torchrun's variables describe and returns (rank, world size):
    backend "nccl" with this process on GPU LOCAL_RANK when CUDA is available, else "gloo". Returns
    (0, 1) and does nothing when none of the variables is set; returns the group's values when one is
    already initialised. InvalidArgumentError names what is wrong when only some are set (a process that
    trained alone would race the others for one out_dir), when they are not whole numbers with
    0 <= RANK < WORLD_SIZE, or when MASTER_ADDR or MASTER_PORT, which the group meets at, is missing."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    given = [name for name in _TORCHRUN_VARIABLES if name in os.environ]
    if not given:
        return 0, 1
    missing = [name for name in (*_TORCHRUN_VARIABLES, "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise InvalidArgumentError(f"the environment sets {', '.join(given)} but not {', '.join(missing)}: launch "
                                   "with torchrun, which sets them all, or unset them to train in one process")
    values = {}
    for name in _TORCHRUN_VARIABLES:
        text = os.environ[name]
        if not (text.isascii() and text.isdigit()):
            raise InvalidArgumentError(f"environment variable {name} must be a whole number >= 0, got {text!r}")
        values[name] = int(text)
    if not values["RANK"] < values["WORLD_SIZE"]:  # else the group waits forever for a rank that never comes
        raise InvalidArgumentError(f"environment variable RANK must be below WORLD_SIZE, got RANK {values['RANK']} "
                                   f"of WORLD_SIZE {values['WORLD_SIZE']}")
    if torch.cuda.is_available():
        torch.cuda.set_device(values["LOCAL_RANK"])
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes, 1 without a process group."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on the process that writes logs and checkpoints (rank 0, or the only one)."""
    return rank() == 0


def shard(count: int, rank: int, world_size: int) -> range:
    """Positions in a global batch of `count` that process `rank` of `world_size` takes: contiguous,
    count // world_size each, together exactly range(count). count must be a multiple of world_size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvalidArgumentError(f"rank must be in [0, world_size) with world_size >= 1, got rank {rank} of "
                                   f"{world_size}")
    if count % world_size:
        raise InvalidArgumentError(f"a global batch of {count} cannot be split evenly over {world_size} processes")
    share = count // world_size
    return range(rank * share, (rank + 1) * share)


def all_reduce(values: Sequence[float], op: str = "sum") -> list[float]:
    """The sum ("sum") or minimum ("min") of `values` elementwise over all processes, in float64; the
    values themselves without a process group."""
    if op not in ("sum", "min"):
        raise InvalidArgumentError(f"op must be 'sum' or 'min', got {op!r}")
    if not dist.is_initialized():
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return tensor.tolist()


@contextmanager
def fail_together(where: str) -> Iterator[None]:
    """Every process enters the block, though in most uses only rank 0 does anything in it, and leaves it
    together: if it raised in any process, that process raises its error and every other one an error
    naming `where`. Without it the others would go on to their next collective and wait there for the failed
    process, under NCCL until its timeout, unless the launcher (torchrun) stops them."""
    failure = None
    try:
        yield
    except Exception as error:  # raised again below, once every process knows
        failure = error
    if all_reduce([failure is not None])[0] == 0:
        return
    if failure is not None:
        raise failure
    raise DynsegError(f"another process failed at {where} (its output holds the error); this one stops with it")


def shutdown() -> None:
    """Leaves the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int of at least `low`, or the option's error naming the bound."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m dynseg.trainer.distributed` (under torchrun or alone): `dynseg train` on the synthetic
    scenes, data-parallel. --batch-size is stage 1's global batch."""
    parser = argparse.ArgumentParser(prog="python -m dynseg.trainer.distributed", description=main.__doc__)
    parser.add_argument("--out", required=True, help="folder for checkpoints and logs (shared between machines)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--images", type=_at_least(1), default=defaults.TRAIN_IMAGES, help="synthetic training images")
    parser.add_argument("--image-size", type=int, nargs=2, default=defaults.IMAGE_SIZE, metavar=("H", "W"))
    parser.add_argument("--semantic-steps", type=_at_least(0), default=defaults.SEMANTIC_STEPS)
    parser.add_argument("--instance-steps", type=_at_least(0), default=defaults.INSTANCE_STEPS)
    parser.add_argument("--batch-size", type=_at_least(1), default=4,
                        help="stage 1 global batch, a multiple of the processes")
    parser.add_argument("--mode", choices=("piecewise", "end-to-end"), default="piecewise")
    parser.add_argument("--lr", type=float, default=defaults.LEARNING_RATE,
                        help=f"stage 1 learning rate (stage 2 uses a {defaults.INSTANCE_LR_DIVISOR}th)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --out from its checkpoints, given the same arguments")
    args = parser.parse_args(argv)
    if not args.out:  # Path("") is the current folder, whose earlier run the trainer would replace
        parser.error("--out is empty (an unset shell variable?): give a folder (\".\" for the current one)")
    if not 0 <= args.seed <= defaults.MAX_SEED:
        parser.error(f"--seed must be in 0..{defaults.MAX_SEED}, got {args.seed}")
    if not all(defaults.MIN_IMAGE_SIDE <= side <= defaults.MAX_IMAGE_SIDE for side in args.image_size):
        parser.error(f"--image-size: each side must be in {defaults.MIN_IMAGE_SIDE}..{defaults.MAX_IMAGE_SIDE}, got "
                     f"{' '.join(map(str, args.image_size))}")

    from .data import SyntheticScenes
    from .model import ModelConfig, build_model
    from .train import TrainConfig, fit

    try:
        init_from_environment()
        torch.manual_seed(args.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
        data = SyntheticScenes(size=args.images, image_size=tuple(args.image_size), seed=args.seed)
        model = build_model(ModelConfig(backbone=args.backbone, class_names=tuple(data.class_names[1:])))
        if torch.cuda.is_available() and dist.is_initialized():
            model.to(torch.device("cuda", torch.cuda.current_device()))
        fit(model, data, out_dir=args.out,
            semantic=TrainConfig(stage="semantic", steps=args.semantic_steps, batch_size=args.batch_size,
                                 learning_rate=args.lr, seed=args.seed),
            instance=TrainConfig(stage="instance", mode=args.mode, steps=args.instance_steps,
                                 learning_rate=args.lr / defaults.INSTANCE_LR_DIVISOR, seed=args.seed),
            printer=print,  # train prints on rank 0 only
            training_data={"dataset": "synthetic", "seed": args.seed, "image_size": tuple(args.image_size)},
            resume=args.resume)
        if is_main():
            print(f"wrote {args.out}/model.safetensors and {args.out}/model.json; next: dynseg eval {args.out}")
    except DynsegError as error:  # a bad argument: one line, as the dynseg commands print it
        raise SystemExit(f"Error: {error}") from None
    except OSError as error:  # a folder or file the system refuses (--out under a file, a full disk)
        where = f": {error.filename}" if error.filename else ""
        raise SystemExit(f"Error: {error.strerror or error}{where}") from None
    finally:
        shutdown()


if __name__ == "__main__":
    main()
