"""GPU dense CRF benchmark: the CUDA kernels against the PyTorch reference on the same card and
against pydensecrf and dynseg's CPU kernels on the same machine's CPU, all in one process.

Cases (ISSUE 5): the semantic CRF (21 labels, 5 iterations, densecrf's kernels: spatial θγ=3 w=3,
bilateral θα=80 θβ=13 w=10) and the instance CRF (L = 2, 21, 101 labels, 3 iterations, spatial θγ=3
w=3, bilateral θα=49 θβ=5 w=4), at 512×512 and 1024×2048, on the shipped coffee photo resized, with
smooth random logits. Every call builds its lattices. The CPU methods run once per case (they are
there for scale; benchmarks/bench_crf.py measures them properly).

GPU times are medians of CUDA-event timings around one enqueued call, the problem and workspace set
up once as a TensorRT plugin would ("call"), and of the same call replayed from a CUDA graph, which
removes the launch gaps ("graph"). "build" is the same call with 0 iterations (lattices, normalisation,
layout changes); "per iteration" is (call − build) / T. The PyTorch reference is the median of 5 calls
after a warm-up. Ratios divide the other method's time by the CUDA call's, both measured here.

    python benchmarks/bench_cuda.py [--repeats 50] [--profile] [--quick] [--once] [--out report.md]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_crf import pydensecrf_call, smooth_unary  # noqa: E402  (one definition of the shared inputs)

from dynseg.sdk import _native, dense_crf, samples  # noqa: E402
from dynseg.trainer.crf import dense_crf_reference  # noqa: E402

SEMANTIC = dict(spatial=(3.0, 3.0), bilateral=(80.0, 13.0, 10.0))
INSTANCE = dict(spatial=(3.0, 3.0), bilateral=(49.0, 5.0, 4.0))
SIZES = ((512, 512), (1024, 2048))
PARITY = 1e-5  # max |ΔQ| against the CPU kernel, as the GPU tests require
CASES = [("semantic", 21, 5, SEMANTIC)] + [("instance", labels, 3, INSTANCE) for labels in (2, 21, 101)]


def resized_photo(height: int, width: int) -> np.ndarray:
    """The coffee photo resized bilinearly to (height, width, 3) uint8."""
    photo = samples.load("coffee").astype(np.float32)
    ys = np.linspace(0, photo.shape[0] - 1, height)
    xs = np.linspace(0, photo.shape[1] - 1, width)
    y0 = np.minimum(ys.astype(int), photo.shape[0] - 2)
    x0 = np.minimum(xs.astype(int), photo.shape[1] - 2)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = photo[y0][:, x0] * (1 - fx) + photo[y0][:, x0 + 1] * fx
    bottom = photo[y0 + 1][:, x0] * (1 - fx) + photo[y0 + 1][:, x0 + 1] * fx
    return np.clip(top * (1 - fy) + bottom * fy + 0.5, 0, 255).astype(np.uint8)


def device_image(photo: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → the planar float32 (3, H, W) image the CUDA kernels read, on the GPU."""
    return torch.tensor(photo.transpose(2, 0, 1).astype(np.float32), device="cuda").contiguous()


class CudaCall:
    """One dense CRF problem on device tensors with its workspace, ready to enqueue."""

    def __init__(self, unary: torch.Tensor, image: torch.Tensor, kernels: dict, iterations: int):
        self.unary = unary
        self.out = torch.empty_like(unary)
        self.image = image
        self.weights = [torch.tensor([kernels["spatial"][1]], device="cuda"),
                        torch.tensor([kernels["bilateral"][2]], device="cuda")]
        self.problem = _native.Problem(
            unary.shape[0], unary.shape[1], unary.shape[2], _native.DeviceArray.of(image, "image"),
            [_native.Kernel(kernels["spatial"][0], 0.0, _native.DeviceArray.of(self.weights[0], "spatial weight")),
             _native.Kernel(kernels["bilateral"][0], kernels["bilateral"][1],
                            _native.DeviceArray.of(self.weights[1], "bilateral weight"))],
            compat=None, normalization="after", iterations=iterations, output=_native.Output.PROBABILITIES,
            threads=0,
        )
        self.nbytes = self.problem.workspace_size_cuda(_native.Pass.FORWARD)
        self.workspace = torch.empty(self.nbytes, dtype=torch.uint8, device="cuda")
        self.pointers = (ctypes.cast(ctypes.c_void_p(unary.data_ptr()), _native._f32p),
                         ctypes.cast(ctypes.c_void_p(self.out.data_ptr()), _native._f32p))

    def enqueue(self) -> None:
        status = _native.library().dynseg_crf_forward_cuda(
            ctypes.byref(self.problem.struct), *self.pointers, self.workspace.data_ptr(), self.nbytes,
            torch.cuda.current_stream().cuda_stream)
        _native._check(status)

    def check(self) -> None:
        _native.check_cuda(self.workspace.data_ptr(), torch.cuda.current_stream().cuda_stream)


def median_event_ms(run, repeats: int) -> float:
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def graph_ms(call: CudaCall, repeats: int) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call.enqueue()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call.enqueue()
    return median_event_ms(graph.replay, repeats)


def profile(call: CudaCall) -> None:
    """The GPU time of each kernel (summed over its launches) in one call, largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        call.enqueue()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=100), flush=True)


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def median_s(run, repeats: int) -> float:
    """The median of `repeats` calls after one uncounted call: the PyTorch reference's first call takes
    ~0.4 s (kernel loading), and its later ones, host-bound, ranged 29–54 ms on one H100."""
    run()
    return float(np.median([seconds(run) for _ in range(repeats)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    parser.add_argument("--profile", action="store_true", help="print the kernels of the first case by GPU time")
    parser.add_argument("--quick", action="store_true",
                        help="skip the PyTorch reference and pydensecrf (comparing two builds: scripts/gpu_compare.sh)")
    parser.add_argument("--once", action="store_true",
                        help="enqueue the first case once and exit, for a kernel profiler (scripts/gpu_check.sh)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.out:  # fail now, not after minutes of timings
        try:
            open(args.out, "a").close()
        except OSError as error:
            parser.error(f"--out {args.out}: {error.strerror or error}")
    if _native.cuda_device_count() == 0:
        sys.exit("bench_cuda: no CUDA device (or the library was built without CUDA)")
    if args.once:
        (height, width), (_, labels, iterations, kernels) = SIZES[0], CASES[0]
        call = CudaCall(torch.tensor(smooth_unary(labels, height, width, seed=labels), device="cuda"),
                        device_image(resized_photo(height, width)), kernels, iterations)
        call.enqueue()
        call.check()
        return
    card = torch.cuda.get_device_name()
    lines = [
        f"Card: {card}; CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}",
        "",
        "| CRF | size | L | T | CUDA call ms | graph ms | build ms | per iteration ms | torch ref (GPU) ms | × torch | "
        "dynseg CPU ms | × CPU | pydensecrf ms | × pydensecrf | max abs dQ vs CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mismatches = []
    for height, width in SIZES:
        photo = resized_photo(height, width)
        image = device_image(photo)
        for name, labels, iterations, kernels in CASES:
            unary_np = smooth_unary(labels, height, width, seed=labels)
            unary = torch.tensor(unary_np, device="cuda")
            call, build = CudaCall(unary, image, kernels, iterations), CudaCall(unary, image, kernels, 0)
            call_ms = median_event_ms(call.enqueue, args.repeats)
            if args.profile:
                profile(call)
                args.profile = False
            call.check()
            build_ms = median_event_ms(build.enqueue, args.repeats)
            replay_ms = graph_ms(call, args.repeats)
            q_gpu = call.out.cpu().numpy()

            # untimed: the thread pool and scratch (the process's first call measured 1.4× a warm one)
            dense_crf(unary_np, photo, iterations=0, **kernels)
            start = time.perf_counter()
            q_cpu = dense_crf(unary_np, photo, iterations=iterations, **kernels)
            cpu_s = time.perf_counter() - start  # one call: the CPU side is for scale, and slow at 1024×2048
            image_hwc = torch.tensor(photo, device="cuda")

            def torch_reference():
                dense_crf_reference(unary, image_hwc, iterations=iterations, **kernels)
                torch.cuda.synchronize()

            # L = 101 at 1024×2048 would need ~40 GB
            torch_s = median_s(torch_reference, 5) if labels <= 21 and not args.quick else None
            dcrf = pydensecrf_call(unary_np, photo, iterations, "after") if kernels is SEMANTIC and not args.quick else None
            dcrf_s = seconds(dcrf) if dcrf else None
            difference = float(np.abs(q_gpu - q_cpu).max())
            fmt = lambda s: "n/a" if s is None else f"{1000 * s:.1f}"
            ratio = lambda s: "n/a" if s is None else f"{1000 * s / call_ms:.0f}×"
            lines.append(
                f"| {name} | {height}×{width} | {labels} | {iterations} | {call_ms:.3f} | {replay_ms:.3f} | {build_ms:.3f} | "
                f"{(call_ms - build_ms) / iterations:.3f} | {fmt(torch_s)} | {ratio(torch_s)} | {fmt(cpu_s)} | "
                f"{ratio(cpu_s)} | {fmt(dcrf_s)} | {ratio(dcrf_s)} | {difference:.1e} |"
            )
            if not difference <= PARITY:
                mismatches.append(f"{name} {height}×{width} L = {labels}")
            print(lines[-1], flush=True)
    report = "\n".join(lines)
    print("\n" + report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    if mismatches:
        sys.exit(f"bench_cuda: the CUDA result differs from the CPU kernel's by more than {PARITY} in "
                 + ", ".join(mismatches) + ": these timings are of a wrong computation")


if __name__ == "__main__":
    main()
