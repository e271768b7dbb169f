"""Dense mean-field CRF in torch: the reference implementation, and the native kernels as a torch op.

`lattice` owns the permutohedral lattice and the kernels' pixel features; `meanfield` owns the
mean-field update and the torch-level `dense_crf_reference`: the readable definition the native kernels are
tested against. `native` wraps those kernels as the torch op `dynseg::mean_field` with autograd,
(`mean_field_native` and `mean_field_native_with_detections`, which training runs on, and
`dense_crf_native`, dense_crf_reference's signature).
"""

from .lattice import PermutohedralLattice, gaussian_features
from .meanfield import dense_crf_reference, mean_field_reference
from .native import (DetectionPotential, crf_kernels, dense_crf_native, mean_field_native,
                     mean_field_native_with_detections)

__all__ = [
    "PermutohedralLattice", "gaussian_features", "mean_field_reference", "dense_crf_reference", "mean_field_native",
    "mean_field_native_with_detections", "DetectionPotential", "dense_crf_native", "crf_kernels",
]
