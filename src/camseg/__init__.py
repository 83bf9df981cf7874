"""camseg: weakly supervised segmentation from image-level labels.

Three stages: classify (CAM-compatible classifier) -> pseudo-label (CAMs -> masks)
-> segment (a real segmentation network trained on the pseudo-masks).
"""

from importlib.metadata import PackageNotFoundError, version

from camseg.resolvers import register as _register_resolvers

try:
    __version__ = version("camseg")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

# ``${camseg.in_channels:...}`` in the config tree resolves wherever camseg is imported.
_register_resolvers()

__all__ = ["__version__"]
