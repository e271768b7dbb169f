"""Datasets and detections for training: the built-in synthetic scenes and a detector simulator.

`SyntheticScenes` draws procedural scenes (numpy drawing, boxes through the torch box helpers) with the
cases the instance CRF exists for: same-class occlusion, clutter, truncation. `simulate_detections`
turns ground-truth boxes into the imperfect detections the CRF's labels come from;
`load_coco_detections` reads a real detector's COCO results file instead.
"""

from .detections import DetectionKind, load_coco_detections, simulate_detections
from .synthetic import VOID, SyntheticScenes

__all__ = ["SyntheticScenes", "VOID", "simulate_detections", "load_coco_detections", "DetectionKind"]

# On-disk datasets: Pascal VOC 2012, SBD, COCO and Cityscapes instance annotations, as SyntheticScenes samples.
from .cityscapes import CITYSCAPES_THING_CLASSES, CityscapesInstances
from .coco import CocoInstances
from .sbd import SbdInstances
from .common import LabelledSample
from .voc import VOC_CLASSES, VocInstances

__all__ += ["VocInstances", "SbdInstances", "CocoInstances", "CityscapesInstances", "LabelledSample"]
__all__ += ["VOC_CLASSES", "CITYSCAPES_THING_CLASSES"]
