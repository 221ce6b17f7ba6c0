"""Multi-scale deformable attention: the function, its kernels (C++, CUDA, Triton) and the ``MSDeformAttn`` module."""

from ops.functional import available_backends, ms_deform_attn
from ops.module import MSDeformAttn

__all__ = ["MSDeformAttn", "available_backends", "ms_deform_attn"]
