"""Multi-scale deformable attention (function, kernels: C++, CUDA, Triton; ``MSDeformAttn``), the
deformable-convolution family, and ``record_sampling``: where their modules sample."""

from ops.deform_conv import DeformConv2d, deform_conv2d
from ops.deform_roi_pool import DeformPSRoIPool, DeformRoIPool, deform_ps_roi_pool, deform_roi_pool
from ops.functional import available_backends, ms_deform_attn
from ops.module import MSDeformAttn
from ops.sampling_record import AttentionSampling, OffsetSampling, record_sampling

__all__ = [
    "AttentionSampling",
    "DeformConv2d",
    "DeformPSRoIPool",
    "DeformRoIPool",
    "MSDeformAttn",
    "OffsetSampling",
    "available_backends",
    "deform_conv2d",
    "deform_ps_roi_pool",
    "deform_roi_pool",
    "ms_deform_attn",
    "record_sampling",
]
