from camseg.models.classifier import CamClassifier, build_encoder

__all__ = ["CamClassifier", "build_encoder"]
