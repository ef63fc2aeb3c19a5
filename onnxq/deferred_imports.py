"""Defer the import of sympy, which onnx_ir imports at start-up and a quantize run never uses.

``onnx_ir`` imports ``sympy`` (about 0.5 s on a 2-core machine, a fifth of a whole RTN run on
512 MiB; docs/SPEED.md) for the arithmetic of symbolic dimensions, which onnxq's passes never
do. :func:`defer_sympy` registers stand-ins for ``sympy`` and for ``onnx_ir._symbolic_shapes``
(the one onnx_ir module that reads sympy attributes while being imported): modules whose first
attribute lookup imports the real module and takes over its namespace, so every later use is a
plain attribute read on the real contents. ``__spec__`` and the other module attributes the
import system reads are real, so ``import sympy`` elsewhere returns the stand-in without
loading anything (unlike :class:`importlib.util.LazyLoader`, whose module loads on that read).

Only the command-line package (:mod:`onnxq.cli`) calls it, first thing, before it imports
onnx_ir; library users' processes are left alone. Where either module is already imported, or
cannot be found, it does nothing. The stand-ins are transparent: symbolic-dimension arithmetic
imports sympy at its first use (tests/test_deferred_imports.py).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types

__all__ = ["defer_sympy"]

_LOCK = threading.RLock()


class _DeferredModule(types.ModuleType):
    """A registered module whose contents are imported at the first missing-attribute lookup."""

    def __getattr__(self, attr: str):  # any missing name, ``__path__`` for a submodule import too
        with _LOCK:
            if self.__dict__.get("_deferred_spec") is not None:
                _load(self)
        return object.__getattribute__(self, attr)


def _load(stand_in: _DeferredModule) -> None:
    """Import the real module under the stand-in's name and copy its namespace into the stand-in."""
    name = stand_in.__name__
    spec = stand_in.__dict__.pop("_deferred_spec")
    if sys.modules.get(name) is stand_in:
        del sys.modules[name]
    try:
        real = importlib.import_module(name)
    except BaseException:
        stand_in._deferred_spec = spec
        sys.modules.setdefault(name, stand_in)
        raise
    stand_in.__dict__.update(real.__dict__)


def _register(name: str, spec: importlib.machinery.ModuleSpec | None) -> None:
    if spec is None or name in sys.modules:
        return
    stand_in = _DeferredModule(name)
    stand_in.__spec__ = spec
    stand_in.__loader__ = spec.loader
    stand_in.__file__ = spec.origin
    stand_in._deferred_spec = spec
    sys.modules[name] = stand_in


def defer_sympy() -> None:
    """Register deferred stand-ins for ``sympy`` and ``onnx_ir._symbolic_shapes`` (see the module docstring).

    Does nothing once ``onnx_ir`` is imported, or where either module is missing.
    """
    if "onnx_ir" in sys.modules or "sympy" in sys.modules:
        return
    try:
        package = importlib.util.find_spec("onnx_ir")
        sympy = importlib.util.find_spec("sympy")
    except (ImportError, ValueError):
        return
    if package is None or sympy is None or package.submodule_search_locations is None:
        return
    shapes = importlib.machinery.PathFinder.find_spec("onnx_ir._symbolic_shapes", package.submodule_search_locations)
    if shapes is None:
        return
    _register("sympy", sympy)
    _register("onnx_ir._symbolic_shapes", shapes)
