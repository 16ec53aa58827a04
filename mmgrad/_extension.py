"""Loads the compiled extension ``mmgrad._C`` if it is there and was built for this torch.

Importing mmgrad must work without a compiler or a built extension: when ``_C`` is missing or was
built against another torch, the reason is logged once and the reference backend serves.
"""

from __future__ import annotations

import importlib
import logging

import torch

logger = logging.getLogger("mmgrad")

_state: dict = {}


def _load() -> None:
    try:
        build_info = importlib.import_module("mmgrad._build_info")
    except ImportError:
        _state["error"] = (
            "mmgrad._C is not built (install with `pip install --no-build-isolation .` "
            "or `make install`)"
        )
        return
    built_for = build_info.TORCH_VERSION
    if built_for != torch.__version__:
        # Loading a C++ extension built against another torch ABI can crash the process.
        _state["error"] = (
            f"mmgrad._C was built for torch {built_for} but torch {torch.__version__} is "
            "installed; rebuild it with `pip install --no-build-isolation --force-reinstall .`"
        )
        return
    try:
        importlib.import_module("mmgrad._C")
    except ImportError as exc:
        _state["error"] = f"mmgrad._C failed to load: {exc}"
        return
    _state["build_info"] = build_info


def cpp_error() -> str | None:
    """None when the C++ extension is loaded, else why it is not."""
    if not _state:
        _load()
        if "error" in _state:
            logger.info("mmgrad: C++ backend unavailable: %s", _state["error"])
    return _state.get("error")


def build_info():
    """The ``mmgrad._build_info`` module of the loaded extension, or None."""
    cpp_error()
    return _state.get("build_info")
