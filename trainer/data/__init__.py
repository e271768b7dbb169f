"""Datasets and detections for training and evaluation.

Datasets: `SyntheticScenes` draws procedural scenes (numpy drawing) with the cases the instance CRF
exists for: same-class occlusion, clutter, truncation; the on-disk loaders read Pascal VOC 2012, SBD,
COCO and Cityscapes instance annotations (`VocInstances`, `SbdInstances`, `CocoInstances`,
`CityscapesInstances`) into samples of the same fields. `sources.open_dataset` opens one by name.

Detections: `simulate_detections` turns ground-truth boxes into the imperfect detections the CRF's
labels come from; `sources.with_detections` attaches a real detector's COCO results file to a dataset
instead (`load_coco_detections`, re-exported from dynseg.sdk.coco_detections, reads one for one image
list).
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
