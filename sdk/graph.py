"""The exported model's contract, shared by the exporter (dynseg.export) and every runtime backend:
the graph's input and output names and the identity of its custom CRF op (docs/ops.md)."""

from __future__ import annotations

INPUTS = ("image", "boxes", "labels", "scores")
OUTPUTS = ("instance_logits", "semantic_probabilities")

DOMAIN = "dynseg"  # the custom op's ONNX domain, and the TensorRT plugin's namespace
OP_TYPE = "MeanFieldCRF"
OP_VERSION = 1
