"""camseg: weakly supervised segmentation from image-level labels.

Three stages: classify (CAM-compatible classifier) -> pseudo-label (CAMs -> masks)
-> segment (a real segmentation network trained on the pseudo-masks).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("camseg")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
