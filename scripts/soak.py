"""Soak test (not a test of the suite): many Segmenter calls on one exported model with varying D and
image sizes, reporting the process's memory (RSS) at the start and the end. A leak (a buffer kept per
call, a session rebuilt per shape) shows as RSS growing with the number of calls.

    python scripts/soak.py MODEL.onnx [--calls 10000] [--max-side 256] [--seed 0]

Needs no torch. Inputs: crops of the shipped photos, sizes drawn in 32..max-side, D drawn in
0..min(20, the model's limit), boxes from dynseg.sdk.commands.images.generated_detections; RSS is read
from /proc/self/status (Linux), or resource.getrusage's peak elsewhere. Prints a line every tenth of
the run: calls, RSS now, calls per second.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings

import numpy as np

from dynseg.sdk import DetectionsDroppedWarning, samples
from dynseg.sdk.commands.images import generated_detections
from dynseg.sdk.segmenter import Segmenter


def rss_mb() -> float:
    """Resident set size of this process in MB (VmRSS; the peak where /proc is missing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an exported .onnx model")
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--max-side", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.calls < 1 or args.max_side < 32:
        parser.error("--calls must be >= 1 and --max-side >= 32")

    segmenter = Segmenter(args.model, backend="onnxruntime")
    photos = [samples.load(name) for name in samples.NAMES]
    rng = np.random.default_rng(args.seed)
    most = min(20, segmenter.max_detections)
    warnings.simplefilter("ignore", DetectionsDroppedWarning)

    def call(index: int) -> None:
        photo = photos[index % len(photos)]
        height = int(rng.integers(32, min(args.max_side, photo.shape[0]) + 1))
        width = int(rng.integers(32, min(args.max_side, photo.shape[1]) + 1))
        image = np.ascontiguousarray(photo[:height, :width])
        dets = generated_detections(height, width, int(rng.integers(0, most + 1)),
                                    num_classes=len(segmenter.class_names), seed=index)
        result = segmenter.segment(image, dets.boxes, dets.labels, dets.scores)
        result.to_coco(index)  # RLE encoding too: pycocotools' buffers are part of a call

    call(0)  # the first call allocates what every call reuses (sessions' arenas, thread pools)
    gc.collect()
    start_rss, began = rss_mb(), time.perf_counter()
    print(f"start: RSS {start_rss:.1f} MB after 1 warm-up call; {args.calls} calls, sides 32..{args.max_side}, "
          f"D 0..{most}")
    step = max(1, args.calls // 10)
    for index in range(1, args.calls + 1):
        call(index)
        if index % step == 0 or index == args.calls:
            rate = index / (time.perf_counter() - began)
            print(f"{index:>6} calls  RSS {rss_mb():.1f} MB  {rate:.1f} calls/s", flush=True)
    gc.collect()
    end_rss = rss_mb()
    print(f"end: RSS {end_rss:.1f} MB ({end_rss - start_rss:+.1f} MB over {args.calls} calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
