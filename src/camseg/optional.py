"""Optional packages (the extras in pyproject.toml), imported where they are used.

A missing one stops with one line naming the extra that brings it, e.g.
``reading DICOM needs the optional package pydicom: pip install 'camseg[dicom]'``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from camseg.errors import ConfigError

# module -> (distribution on PyPI, the camseg extra that installs it; None: a base dependency,
# imported late because it is a compiled package that only some configs use)
EXTRAS: dict[str, tuple[str, str | None]] = {
    "pydicom": ("pydicom", "dicom"),
    "nibabel": ("nibabel", "nifti"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "pydensecrf": ("pydensecrf2", None),
}


class MissingPackageError(ConfigError):
    """A package that the requested feature needs (usually an extra) is not installed."""


def missing_package_message(module: str, purpose: str) -> str:
    package, extra = EXTRAS[module.split(".")[0]]
    if extra is None:
        return f"{purpose} needs {package}, a camseg dependency that is not installed: pip install {package}"
    return f"{purpose} needs the optional package {package}: pip install 'camseg[{extra}]'"


def import_optional(module: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or a one-line :class:`MissingPackageError`.

    Args:
        module: a module of one of the packages in :data:`EXTRAS`, e.g. ``"pydicom.errors"``.
        purpose: what needs it, to start the message (``"reading DICOM"``).
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there but something it imports is not: keep the traceback
        raise MissingPackageError(missing_package_message(module, purpose)) from None
