"""CPU dense CRF benchmark: dynseg's native `dense_crf` against pydensecrf and the PyTorch reference.

One process, the shipped 500×375 coffee photo, densecrf's default kernels (spatial θγ=3, w=3;
bilateral θα=80, θβ=13, w=10). Every call builds its lattices from scratch, so the times include the
lattice builds. Each method's time is the best of --repeats calls (the PyTorch reference, being slow,
gets fewer), the methods taking turns call by call. Ratios are pydensecrf's time divided by the
method's, both measured here.

    python benchmarks/bench_crf.py [--repeats 10] [--labels 21] [--iterations 5]

Prints the machine, a markdown table, and max |ΔQ| of each method against pydensecrf.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import numpy as np

import dynseg.sdk
from dynseg.sdk import _native, dense_crf, samples

SPATIAL = (3.0, 3.0)  # (θγ, w)
BILATERAL = (80.0, 13.0, 10.0)  # (θα, θβ, w)
NORMALIZATIONS = ("symmetric", "after")
TORCH_REPEATS = 2


def smooth_unary(labels: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """float32 (L, H, W) logits: a random field on a grid with one knot every 25 pixels, bilinearly
    interpolated, so neighbouring pixels mostly agree as a network's upsampled logits do."""
    rng = np.random.default_rng(seed)
    knots = rng.normal(0.0, 2.0, size=(labels, height // 25 + 2, width // 25 + 2))  # (L, h, w)
    ys = np.linspace(0, knots.shape[1] - 1, height)
    xs = np.linspace(0, knots.shape[2] - 1, width)
    y0 = np.floor(ys).astype(int).clip(max=knots.shape[1] - 2)
    x0 = np.floor(xs).astype(int).clip(max=knots.shape[2] - 2)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = knots[:, y0][:, :, x0] * (1 - fx) + knots[:, y0][:, :, x0 + 1] * fx  # (L, H, W)
    bottom = knots[:, y0 + 1][:, :, x0] * (1 - fx) + knots[:, y0 + 1][:, :, x0 + 1] * fx
    return np.ascontiguousarray(top * (1 - fy) + bottom * fy, dtype=np.float32)


def interleaved_best_ms(calls: list[tuple[Callable[[], np.ndarray], int]]) -> list[tuple[float, np.ndarray]]:
    """Each call's fastest time in milliseconds over its repeats, and its last result. The calls take
    turns, round after round (after one untimed warm-up each), so a slow spell of this shared
    machine hits every method alike instead of whichever happened to run then."""
    for call, _ in calls:
        call()
    best = [float("inf")] * len(calls)
    results: list[np.ndarray | None] = [None] * len(calls)
    for round_ in range(max(repeats for _, repeats in calls)):
        for index, (call, repeats) in enumerate(calls):
            if round_ >= repeats:
                continue
            start = time.perf_counter()
            results[index] = call()
            best[index] = min(best[index], time.perf_counter() - start)
    return [(1000.0 * ms, result) for ms, result in zip(best, results)]


def pydensecrf_call(unary: np.ndarray, image: np.ndarray, iterations: int, normalization: str):
    """A call of pydensecrf with the same model as dense_crf, or None when it is not installed."""
    try:
        from pydensecrf import densecrf as dcrf
    except ImportError:
        return None
    labels, height, width = unary.shape
    energy = np.ascontiguousarray(-unary.reshape(labels, -1))  # pydensecrf takes −logits
    rgb = np.array(image, dtype=np.uint8, order="C")  # pydensecrf needs a writable C-contiguous image
    # densecrf's NormalizationType values; pydensecrf built with Cython 3 does not export the names
    ntype = {"after": getattr(dcrf, "NORMALIZE_AFTER", 2), "symmetric": getattr(dcrf, "NORMALIZE_SYMMETRIC", 3)}[normalization]

    def call() -> np.ndarray:
        crf = dcrf.DenseCRF2D(width, height, labels)
        crf.setUnaryEnergy(energy)
        crf.addPairwiseGaussian(sxy=SPATIAL[0], compat=SPATIAL[1], normalization=ntype)
        crf.addPairwiseBilateral(sxy=BILATERAL[0], srgb=BILATERAL[1], rgbim=rgb, compat=BILATERAL[2],
                                 normalization=ntype)
        return np.asarray(crf.inference(iterations), dtype=np.float32).reshape(labels, height, width)

    return call


def torch_call(unary: np.ndarray, image: np.ndarray, iterations: int, normalization: str):
    """A call of the PyTorch reference (dynseg.trainer.crf.dense_crf_reference), or None without torch."""
    try:
        import torch

        from dynseg.trainer.crf import dense_crf_reference as torch_dense_crf
    except ImportError:
        return None
    unary_t, image_t = torch.from_numpy(unary), torch.from_numpy(image)

    def call() -> np.ndarray:
        with torch.no_grad():
            q = torch_dense_crf(unary_t, image_t, iterations=iterations, spatial=SPATIAL,
                                bilateral=BILATERAL, normalization=normalization)
        return q.numpy()

    return call, torch.get_num_threads()


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {os.cpu_count()} logical cores ({usable} usable), {platform.system()} {platform.release()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="calls per method; the best counts (default 10)")
    parser.add_argument("--labels", type=int, default=21, help="number of labels L (default 21)")
    parser.add_argument("--iterations", type=int, default=5, help="mean-field iterations (default 5)")
    args = parser.parse_args(argv)
    for name in ("repeats", "labels", "iterations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")

    image = samples.load("coffee")  # (H, W, 3)
    height, width = image.shape[:2]
    unary = smooth_unary(args.labels, height, width)
    all_threads = _native.max_threads()
    print(f"machine: {machine()}")
    print(f"dynseg {dynseg.sdk.__version__}, native library {_native.native_version()}, numpy {np.__version__}")
    print(f"problem: coffee {width}x{height}, L={args.labels}, {args.iterations} iterations, "
          f"spatial (θγ, w)={SPATIAL}, bilateral (θα, θβ, w)={BILATERAL}, lattice builds included, "
          f"best of {args.repeats} (PyTorch reference: best of {min(TORCH_REPEATS, args.repeats)})\n")

    rows, notes = [], []
    for normalization in NORMALIZATIONS:
        methods: list[tuple[str, int | str, Callable[[], np.ndarray], int]] = []
        thread_counts = [1] if all_threads == 1 else [1, all_threads]
        for threads in thread_counts:
            methods.append(("dynseg native", threads, lambda t=threads: dense_crf(
                unary, image, iterations=args.iterations, spatial=SPATIAL, bilateral=BILATERAL,
                normalization=normalization, threads=t), args.repeats))
        reference = pydensecrf_call(unary, image, args.iterations, normalization)
        if reference is None:
            notes.append("pydensecrf: skipped (pydensecrf2 is not installed)")
        else:
            methods.insert(0, ("pydensecrf", 1, reference, args.repeats))
        torch_method = torch_call(unary, image, args.iterations, normalization)
        if torch_method is None:
            notes.append("PyTorch reference: skipped (torch is not installed)")
        else:
            methods.append(("PyTorch reference", torch_method[1], torch_method[0], min(TORCH_REPEATS, args.repeats)))

        # the PyTorch reference churns through far more memory than the others: timed on its own so
        # that its page faults and cache misses do not land in their rounds
        native = [m for m in methods if m[0] != "PyTorch reference"]
        slow = [m for m in methods if m[0] == "PyTorch reference"]
        timings = interleaved_best_ms([(call, repeats) for _, _, call, repeats in native])
        timings += interleaved_best_ms([(call, repeats) for _, _, call, repeats in slow])
        methods = native + slow
        reference_ms, reference_q = None, None
        for (method, threads, _, _), (ms, q) in zip(methods, timings):
            if method == "pydensecrf":
                reference_ms, reference_q = ms, q
            ratio = f"{reference_ms / ms:.2f}" if reference_ms is not None else "n/a"
            delta = f"{np.abs(q - reference_q).max():.1e}" if reference_q is not None else "n/a"
            rows.append((normalization, method, threads, f"{ms:.1f}", ratio, delta))

    print("| normalization | method | threads | best ms | pydensecrf ms / method ms | max abs ΔQ vs pydensecrf |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    for note in dict.fromkeys(notes):
        print(f"\n{note}")


if __name__ == "__main__":
    main()
