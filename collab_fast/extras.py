"""Optional dependencies: the core install (torch, triton, numpy, ninja) runs the loss, the rescaling ops
and the models; the trainer's data sets, reporting and progress bar come with extras. A missing one is
reported in one line that names the extra to install."""

from __future__ import annotations

import importlib

__all__ = ["MissingExtra", "require"]


class MissingExtra(ImportError):
    """An optional dependency is not installed (the message names the pip extra)."""


def require(module: str, extra: str, purpose: str):
    """Imports `module`, or raises MissingExtra: '<purpose> needs <module>: pip install "collab_fast[extra]"'."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MissingExtra(f"{purpose} needs {top}, which is not installed: pip install 'collab_fast[{extra}]'") from None
