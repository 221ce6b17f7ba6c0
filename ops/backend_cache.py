"""The user's choice of ``ms_deform_attn`` backend for ``backend="auto"``: the environment variable and the cache.

``python -m ops.check`` times every backend usable on this device and remembers the fastest per (device name,
torch version, dtype) in ``$XDG_CACHE_HOME/deformable_detr/msda_backends.json`` (``~/.cache/...`` without
``XDG_CACHE_HOME``). ``backend="auto"`` uses that choice; ``DETR_MSDA_BACKEND=<backend>`` overrides it. The same
file keeps the verdicts of the first-use self-check of the GPU kernels (:mod:`ops.self_check`), per device model,
torch version, backend and kernel source.

The file (written atomically)::

    {"version": 1,
     "choices": {"<device> | torch <version> | <dtype>": {"backend": "cuda", ...}},
     "self_checks": {"<device> | torch <version> | <backend> <kernel digest>": {"passed": true, ...}}}
"""

from __future__ import annotations

import functools
import json
import os
import platform
import tempfile
import warnings
from pathlib import Path

import torch

from util.errors import UserError

ENV_VAR = "DETR_MSDA_BACKEND"
FORMAT_VERSION = 1


def cache_file() -> Path:
    """Where ``python -m ops.check`` remembers its choices: ``$XDG_CACHE_HOME`` (else ``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "deformable_detr" / "msda_backends.json"


@functools.cache
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    """The model of the device: the GPU's name (``NVIDIA A100-SXM4-80GB``) or the CPU's."""
    if device.type == "cuda":
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        return _cpu_name()
    return device.type


def cache_key(device: torch.device, dtype: torch.dtype) -> str:
    """``"<device name> | torch <version> | <dtype>"``: a choice holds for one device model, torch and dtype."""
    return f"{device_name(device)} | torch {torch.__version__} | {str(dtype).replace('torch.', '')}"


def env_backend(allowed: tuple[str, ...]) -> str | None:
    """The backend named by ``DETR_MSDA_BACKEND``, None when unset or empty; a name not in ``allowed`` is an error."""
    name = os.environ.get(ENV_VAR, "").strip()
    if not name:
        return None
    if name not in allowed:
        raise UserError(
            f"the environment variable {ENV_VAR}={name!r} names no backend of ms_deform_attn: set it to one of "
            f"{', '.join(allowed)}, or unset it"
        )
    return name


_warned_corrupt: set[tuple[str, int]] = set()


@functools.cache
def _parse(path: str, mtime_ns: int, size: int) -> dict[str, str]:
    """key -> backend of the file at ``path`` as it was at ``mtime_ns`` (cached per file state); a file that is not
    what ``python -m ops.check`` writes is ignored with one warning."""
    try:
        content = json.loads(Path(path).read_text())
        choices = content["choices"]
        if content.get("version") != FORMAT_VERSION or not isinstance(choices, dict):
            raise ValueError(f"expected format version {FORMAT_VERSION} with a 'choices' object")
        parsed = {}
        for key, entry in choices.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("backend"), str):
                raise ValueError(f"the entry {key!r} has no backend name")
            parsed[key] = entry["backend"]
        return parsed
    except (OSError, ValueError, KeyError, TypeError) as error:
        if (path, mtime_ns) not in _warned_corrupt:
            _warned_corrupt.add((path, mtime_ns))
            warnings.warn(
                f"ignoring the ms_deform_attn backend cache {path}: it is not what python -m ops.check writes "
                f"({error}); run python -m ops.check again or delete the file",
                RuntimeWarning,
                stacklevel=4,
            )
        return {}


def remembered_backend(device: torch.device, dtype: torch.dtype) -> str | None:
    """The backend ``python -m ops.check`` found fastest for this device model, torch and dtype, if any."""
    path = cache_file()
    try:
        status = path.stat()
    except OSError:
        return None
    return _parse(str(path), status.st_mtime_ns, status.st_size).get(cache_key(device, dtype))


def _read_content(path: Path) -> dict:
    """The file's sections ({} for a missing, corrupt or other-version file: it is then replaced whole)."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(content, dict) or content.get("version") != FORMAT_VERSION:
        return {}
    return {name: section for name, section in content.items() if name != "version" and isinstance(section, dict)}


def _write_section_entry(section: str, key: str, entry: dict) -> Path:
    """Set ``entry`` under ``key`` in ``section``, keeping every other entry; written to a temporary file and
    renamed, so that a reader never sees half a file."""
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    content = _read_content(path)
    content.setdefault(section, {})[key] = entry
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as file:
        json.dump({"version": FORMAT_VERSION, **content}, file, indent=2, sort_keys=True)
        file.write("\n")
    os.replace(file.name, path)
    return path


def remember(device: torch.device, dtype: torch.dtype, backend: str, details: dict) -> Path:
    """Record ``backend`` as the choice for this device model, torch and dtype; returns the file written.

    Other entries are kept (a corrupt file is replaced).
    """
    return _write_section_entry("choices", cache_key(device, dtype), {"backend": backend, **details})


def self_check_key(device: torch.device, backend: str, kernel_digest: str) -> str:
    """``"<device name> | torch <version> | <backend> <kernel digest>"``: a verdict holds for one kernel source."""
    return f"{device_name(device)} | torch {torch.__version__} | {backend} {kernel_digest}"


def remembered_self_check(key: str) -> bool | None:
    """The remembered verdict of the self-check ``key`` (True: passed), None if there is none."""
    entry = _read_content(cache_file()).get("self_checks", {}).get(key)
    return entry.get("passed") if isinstance(entry, dict) and isinstance(entry.get("passed"), bool) else None


def remember_self_check(key: str, passed: bool, details: dict) -> Path:
    """Record the verdict of the self-check ``key``; other entries are kept."""
    return _write_section_entry("self_checks", key, {"passed": passed, **details})
