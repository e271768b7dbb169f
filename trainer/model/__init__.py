"""The Dynamically Instantiated Network: `network` composes it, `semantic_crf` and `instance` hold
its CRFs and the instance unaries."""

from .instance import InstanceConfig, InstanceCRF, InstanceUnaries
from .network import (
    DynamicallyInstantiatedNetwork, ModelConfig, NetworkOutput, build_model, require_valid_detections,
)
from .semantic_crf import SemanticCRF, SemanticCRFConfig

__all__ = [
    "DynamicallyInstantiatedNetwork", "ModelConfig", "NetworkOutput", "build_model", "require_valid_detections",
    "SemanticCRF", "SemanticCRFConfig", "InstanceConfig", "InstanceCRF", "InstanceUnaries",
]
