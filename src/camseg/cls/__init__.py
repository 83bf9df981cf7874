"""Stage 1: the CAM-compatible classifier trained on image-level labels."""

from camseg.cls.module import ClassifierModule

__all__ = ["ClassifierModule"]
