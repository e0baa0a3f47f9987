"""Optional dependencies: the core install (torch, triton, numpy, ninja) runs the loss, the rescaling ops
and the models; the trainer's data sets, reporting and progress bar come with extras. A missing one is
reported in one line that names the extra to install."""

from __future__ import annotations

import importlib

__all__ = ["MissingExtra", "require"]


class MissingExtra(ImportError):
    """An optional dependency is not installed (the message names the pip extra)."""


# The name a user installs, where it differs from the module's.
_PACKAGE = {"PIL": "Pillow", "sklearn": "scikit-learn", "nvidia.dali": "NVIDIA DALI"}


def require(module: str, extra: str, purpose: str, *, hint: str = ""):
    """Imports `module`, or raises MissingExtra in one line: '<purpose> needs <package>, which is not
    installed: pip install 'collab_fast[<extra>]'' and then `hint` (an alternative that needs nothing)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = next((v for k, v in _PACKAGE.items() if module == k or module.startswith(k + ".")),
                       module.split(".")[0])
        missing = isinstance(e, ModuleNotFoundError) and e.name is not None and module.startswith(e.name)
        why = "which is not installed" if missing else f"which does not import here ({e})"
        raise MissingExtra(f"{purpose} needs {package}, {why}: pip install 'collab_fast[{extra}]'"
                           + (f"; {hint}" if hint else "")) from None
