"""``ms_deform_attn``: one entry point over the CUDA, C++ CPU, Triton and pure-PyTorch implementations."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import torch

from ops import backend_cache, self_check, triton_backend
from ops.deformconv_backend import ms_deform_attn_deformconv
from ops.pytorch_backend import ms_deform_attn_pytorch
from ops.validation import _FLOAT_DTYPES, checked_level_shapes, validate_inputs

BACKENDS = ("auto", "pytorch", "cpu", "cuda", "triton", "deformconv")
# formulations in plain PyTorch ops: they run wherever those ops run and export to ONNX
FORMULATIONS = {"pytorch": ms_deform_attn_pytorch, "deformconv": ms_deform_attn_deformconv}
KERNELS = ("cpu", "cuda")
_warned_fallback: set[str] = set()


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _autocast_enabled(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type)


_kernel_loaded: dict[str, bool] = {}  # kind -> whether it loaded; read while tracing under torch.compile


def _load_kernel(kind: str) -> None:
    """Build (first time) and load the compiled kernel ``kind``; raises ``ops.build.KernelBuildError``."""
    from ops import build  # imported here so that ``python -m ops.build`` does not find itself half-imported

    try:
        build.load_cpu_kernel() if kind == "cpu" else build.load_cuda_kernel()
    except build.KernelBuildError:
        _kernel_loaded[kind] = False
        raise
    _kernel_loaded[kind] = True


def _kernel_usable(kind: str) -> bool:
    from ops.build import KernelBuildError

    try:
        _load_kernel(kind)
        return True
    except KernelBuildError:
        return False


def _resolve_backend_traced(backend: str, device: torch.device) -> str:
    """resolve_backend while torch.compile traces: building is impossible there, so use what eager loaded."""
    kind = device.type if backend == "auto" else backend
    if kind in KERNELS and _kernel_loaded.get(kind, False):
        return kind
    if backend == "auto":
        return "pytorch"
    if backend in FORMULATIONS or backend == "triton":
        return backend
    raise RuntimeError(
        f"the {backend} kernel must be loaded before torch.compile traces ms_deform_attn: call it "
        "once eagerly or call ops.available_backends() first"
    )


def available_backends() -> list[str]:
    """The backends usable on this machine; builds the kernels on first call (may take a minute).

    ``"pytorch"`` always; ``"cpu"`` when the C++ kernel builds; ``"cuda"`` when a GPU is visible and the CUDA
    kernel builds; ``"triton"`` where triton imports and a GPU is visible or ``TRITON_INTERPRET=1`` was set.
    """
    usable = ["pytorch"]
    if _kernel_usable("cpu"):
        usable.append("cpu")
    if torch.cuda.is_available() and _kernel_usable("cuda"):
        usable.append("cuda")
    if triton_backend.is_available():
        usable.append("triton")
    return usable


def _preferred_backend(device: torch.device, dtype: torch.dtype | None) -> str | None:
    """What "auto" should run if it can: ``DETR_MSDA_BACKEND``, else the choice ``python -m ops.check`` remembered."""
    named = backend_cache.env_backend(BACKENDS)
    if named is not None and named != "auto":
        return named
    return backend_cache.remembered_backend(device, dtype) if dtype is not None else None


def _resolve_preferred(preferred: str, device: torch.device) -> str | None:
    """``preferred`` if it runs on ``device`` and loads here, else None (with one warning if it cannot be built)."""
    try:
        return resolve_backend(preferred, device)
    except ValueError:  # a backend of another device (DETR_MSDA_BACKEND=cuda, tensors on the CPU) or an unknown name
        return None
    except RuntimeError as error:  # KernelBuildError, or a backend that cannot run here
        if preferred not in _warned_fallback:
            _warned_fallback.add(preferred)
            warnings.warn(
                f"{error}\nms_deform_attn's auto backend does not use {preferred}.", RuntimeWarning, stacklevel=4
            )
        return None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The implementation that runs for ``backend`` on ``device``: "pytorch", "cpu", "cuda", "triton" or
    "deformconv".

    "auto" takes, in this order, the backend named by ``DETR_MSDA_BACKEND``, the one ``python -m ops.check`` found
    fastest for this device model, torch and ``dtype``, and else the kernel of the device (pytorch if it cannot be
    built); a preferred backend that does not run on ``device`` or cannot be built is passed over.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in FORMULATIONS:
        return backend
    if backend == "triton":
        triton_backend.check_usable(device)
        return backend
    if backend == "auto":
        preferred = _preferred_backend(device, dtype)
        chosen = _resolve_preferred(preferred, device) if preferred is not None else None
        if chosen is not None:
            return chosen
        kind = device.type
        if kind not in KERNELS:
            return "pytorch"
        from ops.build import KernelBuildError

        try:
            _load_kernel(kind)
            return kind
        except KernelBuildError as error:
            if kind not in _warned_fallback:
                _warned_fallback.add(kind)
                warnings.warn(
                    f"{error}\nms_deform_attn falls back to the pytorch backend on {kind}.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return "pytorch"
    if device.type != backend:
        raise ValueError(f"backend {backend!r} runs on {backend} tensors but value is on {device}")
    _load_kernel(backend)  # an explicitly requested kernel that cannot be built raises KernelBuildError
    return backend


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str = "auto",
    level_shapes: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Multi-scale deformable attention (Zhu et al., ICLR 2021, eq. 3) without the projections.

    For every query q and head m: ``out[q, m] = sum_l sum_p A[q, m, l, p] * bilinear(value_l[m], loc[q, m, l, p])``,
    where location (x, y) in [0, 1] samples pixel (x * W_l - 0.5, y * H_l - 0.5) and pixels outside the map
    are zero (``grid_sample`` with ``align_corners=False`` and zero padding).

    Args:
        value: (N, S, M, D), the L levels flattened row-major one after another, S = sum(H_l * W_l).
        spatial_shapes: (L, 2) int64, rows (H_l, W_l).
        level_start_index: (L,) int64, the first row of each level in S.
        sampling_locations: (N, Lq, M, L, P, 2) as (x, y) normalised to [0, 1]; points outside sample zeros.
        attention_weights: (N, Lq, M, L, P).
        backend: "auto" (``DETR_MSDA_BACKEND`` if set, else the fastest found by ``python -m ops.check`` on this
            device, else the compiled kernel for the tensors' device, else pytorch with one warning; see
            :func:`resolve_backend`), "pytorch" (``grid_sample``), "cpu" (C++ kernel), "cuda" (CUDA kernel),
            "triton" (Triton kernels: CUDA tensors, or CPU tensors under Triton's interpreter, ``TRITON_INTERPRET=1``)
            or "deformconv" (torchvision's ``deform_conv2d``: for ONNX export as DeformConv; the slowest here).
            The first use of "cuda" or "triton" on a device checks the kernel against the float64 reference and
            runs "pytorch" instead if it disagrees (:mod:`ops.self_check`; ``DETR_MSDA_SELF_CHECK=0``: no check).
        level_shapes: ``spatial_shapes`` as L pairs of Python (or symbolic) ints, for the pytorch backend; None
            reads them from ``spatial_shapes``. Pass the feature maps' own sizes when exporting with dynamic image
            sizes: values read from a tensor become constants (or unbacked symbols) in the exported graph.

    Returns:
        (N, Lq, M * D) in the inputs' dtype; differentiable in value, sampling_locations and attention_weights.

    The floating inputs are float32, float64, float16 or bfloat16 (the kernels accumulate half precision in
    float32). Mixed dtypes run in their common dtype, so that float32 sampling locations keep their precision
    (bfloat16 resolves a coordinate to only 1/256 of the map): value in bfloat16 with locations in float32 runs
    in float32, and the output comes back in value's dtype (in the common dtype under autocast); gradients flow
    back in each input's own dtype. Where no gradient is recorded, the cpu kernel samples a half-precision value
    at float32 locations and weights as they are (float32 accumulation, no float32 copy of value; outside
    autocast): the fast inference path. Pass all three in bfloat16 or float16 to run the half-precision kernel.
    The kernels are torch.library custom ops with fake implementations, so ``torch.compile`` traces through
    them; a kernel cannot be built while tracing, so one eager call (or ``ops.available_backends()``) must load
    it first, else "auto" traces the pytorch backend.
    """
    floating = (value, sampling_locations, attention_weights)
    if all(isinstance(tensor, torch.Tensor) and tensor.dtype in _FLOAT_DTYPES for tensor in floating) and (
        len({tensor.dtype for tensor in floating}) > 1
    ):
        return _ms_deform_attn_mixed(*floating, spatial_shapes, level_start_index, backend, level_shapes)
    checked_shapes = validate_inputs(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        check_layout=not _is_compiling(),
    )
    chosen = (
        _resolve_backend_traced(backend, value.device)
        if _is_compiling()
        else resolve_backend(backend, value.device, value.dtype)
    )
    if not _is_compiling():  # a GPU kernel that never ran on this device is checked first (ops.self_check)
        chosen = self_check.confirmed(chosen, value.device, functools.partial(_run_kernel, chosen))
    if chosen in FORMULATIONS:
        level_shapes = level_shapes if level_shapes is not None else checked_shapes
        if level_shapes is None:  # traced by torch.compile, or a CUDA graph capture of tensors not checked before
            level_shapes = [(int(height), int(width)) for height, width in spatial_shapes.tolist()]
        return FORMULATIONS[chosen](value, level_shapes, sampling_locations, attention_weights)
    return _run_kernel(chosen, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def projected_runs(value: torch.Tensor, *tensors: torch.Tensor, backend: str = "auto") -> bool:
    """Whether the cpu kernel's inference entries (:func:`ms_deform_attn_projected`, and a half-precision value at
    float32 locations) can run for ``value`` and the other inputs: on the CPU, with no gradient recorded, eagerly,
    where ``backend`` resolves to the cpu kernel."""
    if _is_compiling() or value.device.type != "cpu" or value.dtype not in _FLOAT_DTYPES:
        return False
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in (value, *tensors)):
        return False
    return resolve_backend(backend, value.device, value.dtype) == "cpu"


def ms_deform_attn_projected(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    reference_points: torch.Tensor,
    projected: torch.Tensor,
) -> torch.Tensor:
    """:func:`ms_deform_attn` with its locations and weights computed in the cpu kernel from the query's projection,
    as ``ops.MSDeformAttn`` computes them for 2-d reference points: inference only (no gradient), on the CPU, where
    :func:`projected_runs` holds.

    Args:
        value: (N, S, M, D).
        spatial_shapes, level_start_index: as for :func:`ms_deform_attn`.
        reference_points: (N, Lq, L, 2), (x, y) in [0, 1] of each padded level.
        projected: (N, Lq, M * L * P * 3): each query's sampling offsets (M, L, P, 2) in pixels of their level,
            then its attention logits (M, L * P), softmaxed over each head's L * P in the kernel.

    Returns:
        (N, Lq, M * D) in value's dtype; the sums in float32 at least. Nothing of size Lq * M * L * P is written
        (no locations, no weights, no float32 copy of the offsets).
    """
    _load_kernel("cpu")
    checked_level_shapes(spatial_shapes, level_start_index, value.shape[1])
    coordinates = torch.float64 if value.dtype == torch.float64 else torch.float32
    return torch.ops.deformable_detr.ms_deform_attn_projected_forward(
        value.contiguous(),
        spatial_shapes.long().contiguous(),
        level_start_index.long().contiguous(),
        reference_points.to(coordinates).contiguous(),
        projected.to(value.dtype).contiguous(),
    )


def _ms_deform_attn_mixed(
    value: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    backend: str,
    level_shapes: Sequence[tuple[int, int]] | None,
) -> torch.Tensor:
    """:func:`ms_deform_attn` of floating inputs of more than one dtype (see there): in their common dtype, or a
    half-precision value at float32 locations and weights as they are (:func:`_samples_half_at_float`)."""
    common = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
    out_dtype = common if _autocast_enabled(value.device.type) else value.dtype
    if out_dtype == value.dtype and _samples_half_at_float(value, sampling_locations, attention_weights, backend):
        validate_inputs(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, float_coordinates=True
        )
        return _run_kernel("cpu", value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    output = ms_deform_attn(
        value.to(common),
        spatial_shapes,
        level_start_index,
        sampling_locations.to(common),
        attention_weights.to(common),
        backend,
        level_shapes,
    )
    return output.to(out_dtype)


def _samples_half_at_float(
    value: torch.Tensor, sampling_locations: torch.Tensor, attention_weights: torch.Tensor, backend: str
) -> bool:
    """Whether the cpu kernel runs a float16/bfloat16 ``value`` with float32 locations and weights as they are:
    where :func:`projected_runs` holds for them (and, the caller checks, outside autocast, which asks for a float32
    output)."""
    return (
        value.dtype in (torch.float16, torch.bfloat16)
        and (sampling_locations.dtype, attention_weights.dtype) == (torch.float32, torch.float32)
        and projected_runs(value, sampling_locations, attention_weights, backend=backend)
    )


def _run_kernel(
    kernel: str,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The custom op of ``kernel`` ("cpu", "cuda" or "triton") on contiguous inputs; differentiable."""
    namespace = torch.ops.deformable_detr
    forward = namespace.ms_deform_attn_triton_forward if kernel == "triton" else namespace.ms_deform_attn_forward
    return forward(
        value.contiguous(),
        spatial_shapes.long().contiguous(),
        level_start_index.long().contiguous(),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )
