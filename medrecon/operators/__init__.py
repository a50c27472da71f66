"""Physics forward operators: the linear-operator algebra, CT, MRI, masks and finite differences."""

from __future__ import annotations

from medrecon.operators.base import Diagonal, Identity, LinearOperator, SamplingOperator
from medrecon.operators.ct import FBP_FILTERS, CTProjector, FanBeamCT, ParallelBeamCT, fbp_filter
from medrecon.operators.diff import FiniteDifference
from medrecon.operators.masks import (
    equispaced_mask,
    gaussian1d_mask,
    limited_angle_angles,
    mri_mask,
    poisson_disc_mask,
    random_mask,
    sparse_view_angles,
)
from medrecon.operators.mri import (
    FFT2c,
    CoilExpand,
    MaskedFourier,
    MultiCoilMRI,
    estimate_coil_maps,
    fft2c,
    ifft2c,
)

__all__ = [
    "LinearOperator", "SamplingOperator", "Identity", "Diagonal",
    "CTProjector", "ParallelBeamCT", "FanBeamCT", "FBP_FILTERS", "fbp_filter",
    "FFT2c", "CoilExpand", "MaskedFourier", "MultiCoilMRI", "estimate_coil_maps", "fft2c", "ifft2c",
    "FiniteDifference",
    "sparse_view_angles", "limited_angle_angles", "random_mask", "equispaced_mask",
    "gaussian1d_mask", "poisson_disc_mask", "mri_mask",
]
