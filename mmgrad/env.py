"""``python -m mmgrad.env``: versions, and which backends serve which device (and why not)."""

from __future__ import annotations

import argparse
import importlib
import os
import platform

import torch

import mmgrad
from mmgrad import ops
from mmgrad._extension import build_info, cpp_error


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except ImportError:
        return "not installed"


def _extension_line() -> str:
    """What mmgrad._C was built with (torch, CUDA version and architectures), or why it is not
    loaded (missing, or built for another torch: refused before loading)."""
    error = cpp_error()
    if error is not None:
        return f"mmgrad._C: not loaded: {error}"
    info = build_info()
    cuda = getattr(info, "CUDA_VERSION", None)
    if cuda is not None:
        kernels = f"CUDA kernels for architectures {info.CUDA_ARCHS}"
    else:
        why = getattr(info, "CUDA_SKIPPED", None) or "built before the CUDA kernels existed"
        kernels = f"CPU kernels only: {why}"
    return f"mmgrad._C built for torch {info.TORCH_VERSION}, CUDA {cuda} ({kernels})"


def report() -> str:
    """A human-readable report of versions and backend availability."""
    lines = [
        f"mmgrad {mmgrad.__version__}",
        f"python {platform.python_version()} on {platform.machine()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton {_version('triton')}",
    ]
    lines.append(_extension_line())
    devices = ["cpu"]
    # Asking whether CUDA is available initialises nothing until a tensor is made; this is the
    # one place mmgrad asks, and only when the user runs this report.
    if torch.cuda.is_available():
        devices.append("cuda")
        lines.append(f"GPU: {torch.cuda.get_device_name(0)}")
    else:
        lines.append("GPU: none visible")
    for device in devices:
        try:
            picked = ops.resolve_backend(torch.device(device))
        except RuntimeError as exc:  # MMGRAD_BACKEND forces one that cannot serve this device
            picked = f"none: {exc}"
        chooser = "MMGRAD_BACKEND" if os.environ.get("MMGRAD_BACKEND") else "auto"
        lines.append(f"backends for {device} tensors ({chooser} picks: {picked}):")
        for name, why in ops.available_backends(device).items():
            lines.append(f"  {name:<10} {'available' if why is None else 'unavailable: ' + why}")
    return "\n".join(lines)


if __name__ == "__main__":
    argparse.ArgumentParser(prog="python -m mmgrad.env", description=__doc__).parse_args()
    print(report())
