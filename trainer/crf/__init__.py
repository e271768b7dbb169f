"""Dense mean-field CRF, PyTorch reference implementation.

`lattice` owns the permutohedral lattice and the kernels' pixel features; `meanfield` owns the
mean-field update and the torch-level `dense_crf`. This is the readable definition the native kernels
are tested against.
"""

from .lattice import PermutohedralLattice, gaussian_features
from .meanfield import dense_crf, mean_field

__all__ = ["PermutohedralLattice", "gaussian_features", "mean_field", "dense_crf"]
