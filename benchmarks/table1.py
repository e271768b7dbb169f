"""The paper's Table 1 on the synthetic benchmark, CPU-sized.

Stage 1 (the semantic subnetwork) is trained once; from it, stage 2 trains the instance subnetwork
with each set of unary terms (Box, Box+Global, Box+Global+Shape), piecewise and end-to-end, and each
result is evaluated on held-out scenes with simulated detections. A detection-refinement baseline of
the kind the paper argues against (each box becomes the pixels inside it whose semantic probability
of the box's class exceeds 0.5, ranked by the detector's score) is evaluated on the stage-1 network.

    python benchmarks/table1.py --out table1 [--images 400] [--val-images 50] [--image-size 96 120]
                                [--semantic-steps 600] [--instance-steps 100] [--seed 0]

Prints a markdown table (values in %) and writes it as results.json into --out, beside the seven
checkpoints it trains there (stage 1, then stage 2 six ways: several hundred MB in all).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dynseg.trainer.data import SyntheticScenes
from dynseg.trainer.evaluation import evaluate
from dynseg.trainer.model import InstanceConfig, ModelConfig, build_model, require_valid_detections
from dynseg.trainer.checkpoint import load_checkpoint
from dynseg.trainer.train import TrainConfig, evaluation_inputs, initialise_templates, predict, train

TERMS = {
    "Box": dict(box_term=True, global_term=False, shape_term=False),
    "Box+Global": dict(box_term=True, global_term=True, shape_term=False),
    "Box+Global+Shape": dict(box_term=True, global_term=True, shape_term=True),
}


def quiet(*_):
    pass


@torch.no_grad()
def refinement_baseline(model, dataset, *, seed: int) -> tuple[list[dict], list[dict]]:
    """Each detection's mask: its box's pixels where Q_sem(class) > 0.5, a pixel of several boxes going to
    the most confident; ranked by detector score."""
    model.eval()
    predictions, ground_truths = [], []
    for image, detections, truth in evaluation_inputs(dataset, seed=seed, num_classes=model.config.num_classes):
        boxes, labels, scores = require_valid_detections(
            detections["boxes"], detections["labels"], detections["scores"], height=image.shape[1],
            width=image.shape[2], num_classes=model.config.num_classes,
        )
        logits = model.semantic_unary(image[None])[0]
        if model.semantic_crf is not None:
            logits, _ = model.semantic_crf(logits, image, boxes, labels, scores)
        q_sem = torch.softmax(logits, 0)
        # One label map, as every other row's argmax is: the released evaluation reads instances from a
        # map, where two detections of one object cannot both be scored, nor an empty mask counted.
        instance_map = torch.zeros(image.shape[1:], dtype=torch.int64)
        # painted least confident first, so the most confident box (the first of equals) takes a shared pixel
        for d in torch.argsort(scores, descending=True, stable=True).flip(0).tolist():
            x1, y1, x2, y2 = boxes[d].long().tolist()
            inside = q_sem[labels[d], y1 : y2 + 1, x1 : x2 + 1] > 0.5
            instance_map[y1 : y2 + 1, x1 : x2 + 1][inside] = d + 1
        masks = {d: (instance_map == d + 1).numpy() for d in range(len(scores))}
        kept = [d for d, mask in masks.items() if mask.any()]
        empty = np.zeros((0, *image.shape[1:]), bool)
        predictions.append({"masks": np.stack([masks[d] for d in kept]) if kept else empty,
                            "labels": labels[kept].numpy(), "scores": scores[kept].numpy()})
        ground_truths.append(truth)
    return predictions, ground_truths


def row(name: str, metrics: dict) -> str:
    values = [metrics["ap_r"]["0.5"], metrics["ap_r"]["0.7"], metrics["ap_r"]["0.9"], metrics["ap_r_vol"],
              metrics["matching_iou"]]
    return f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in values) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--val-images", type=int, default=50)
    parser.add_argument("--image-size", type=int, nargs=2, default=(96, 120))
    parser.add_argument("--semantic-steps", type=int, default=600)
    parser.add_argument("--instance-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in ("images", "val_images", "semantic_steps", "instance_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if min(args.image_size) < 32:  # SyntheticScenes' MIN_IMAGE_SIDE
        parser.error(f"--image-size must be two sides of at least 32, got {args.image_size}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")

    began = time.perf_counter()
    torch.manual_seed(args.seed)
    train_set = SyntheticScenes(size=args.images, image_size=tuple(args.image_size), seed=args.seed)
    val_set = SyntheticScenes(size=args.val_images, image_size=tuple(args.image_size), seed=args.seed + 1)
    config = ModelConfig(class_names=tuple(train_set.class_names[1:]))
    model = build_model(config)
    train(model, train_set, TrainConfig(stage="semantic", steps=args.semantic_steps, learning_rate=0.02,
                                        seed=args.seed), out_dir=args.out / "semantic", printer=quiet)

    results = {"baseline: detection refinement": evaluate(*refinement_baseline(model, val_set, seed=args.seed + 1),
                                                          num_classes=config.num_classes)}
    for mode in ("piecewise", "end-to-end"):
        for name, terms in TERMS.items():
            variant = replace(config, instance=replace(InstanceConfig(), **terms))
            model = build_model(variant)
            model.load_state_dict(load_checkpoint(args.out / "semantic").state_dict())
            if terms["shape_term"]:
                initialise_templates(model, train_set, seed=args.seed)
            train(model, train_set, TrainConfig(stage="instance", mode=mode, steps=args.instance_steps,
                                                learning_rate=0.001, seed=args.seed),
                  out_dir=args.out / f"{name}-{mode}", printer=quiet)
            results[f"{name}, {mode}"] = evaluate(*predict(model, val_set, seed=args.seed + 1),
                                                  num_classes=config.num_classes)

    print(f"synthetic scenes {args.image_size[0]}x{args.image_size[1]}, {args.images} training / "
          f"{args.val_images} held-out images, stage 1 {args.semantic_steps} steps, stage 2 "
          f"{args.instance_steps} steps, protocol original, values in %, "
          f"{(time.perf_counter() - began) / 60:.1f} min\n")
    print("| method | AP^r 0.5 | AP^r 0.7 | AP^r 0.9 | AP^r_vol | Matching IoU |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, metrics in results.items():
        print(row(name, metrics))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
