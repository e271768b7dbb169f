"""Segments two crops of the shipped coffee photo with an exported model and pickles, per crop, the
result and the graph's raw outputs (what `dynseg validate` compares).

    python tests/plugins/segment_case.py MODEL.onnx PHOTO.npy OUT.pickle

tests/plugins/test_aarch64.py runs it on this machine and under qemu-aarch64 (onnxruntime's aarch64
wheel, the kernel library cross-built for ARM) and holds the two to `dynseg validate`'s checks.
PHOTO.npy: an (H, W, 3) uint8 image of at least 221 x 301 (the shipped coffee photo, say).
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np

from dynseg.sdk import Segmenter


def main(model: str, photo_path: str, out: str) -> None:
    photo = np.load(photo_path)
    segmenter = Segmenter(model, threads=2)
    crops = {"coffee top left": (photo[:96, :128], [[10, 5, 90, 80], [60, 20, 120, 95]], [1, 2], [0.9, 0.6]),
             "coffee centre": (photo[140:221, 200:301], [[0, 0, 100, 80], [30, 10, 70, 60], [5, 40, 50, 79]],
                               [2, 3, 1], [0.8, 0.7, 0.95])}
    runs = {name: segmenter.segment_with_outputs(np.ascontiguousarray(image), np.array(boxes, np.float32), labels,
                                                 scores)
            for name, (image, boxes, labels, scores) in crops.items()}
    Path(out).write_bytes(pickle.dumps(runs))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
