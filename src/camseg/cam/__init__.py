"""The CAM engine: class activation maps, test-time augmentation, pseudo-mask policy.

Every method maps ``(images (B,C,H,W), labels (B,K) 0/1 or None)`` to raw maps
``(B,K,h,w) >= 0`` at its working resolution; :class:`MultiScaleCAM` resizes to
(H,W) and normalises to [0,1]; :class:`PseudoMaskPolicy` turns normalised maps into
uint8 masks (0 background, k class k, 255 ignore).

Library use, on any CAM-compatible classifier (anything with ``features(x) ->
(B,C,h,w)`` and a ``classifier`` ``nn.Linear`` applied after global average
pooling, such as :class:`camseg.models.classifier.CamClassifier`)::

    from camseg.cam import CAM, MultiScaleCAM, PseudoMaskPolicy

    engine = MultiScaleCAM(CAM(model), scales=(1.0, 0.5, 1.5, 2.0), flip=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cams = engine(images, labels)                     # (B,K,H,W) in [0,1]
    masks = PseudoMaskPolicy(fg_threshold=0.3, bg_threshold=0.05)(cams, labels)

The Grad-CAM family (:class:`GradCAM`, :class:`GradCAMPlusPlus`, :class:`LayerCAM`)
and :class:`ScoreCAM` work on any ``nn.Module`` whose forward returns logits (B,K),
given a target layer name from ``model.named_modules()``::

    cams = GradCAM(torchvision_resnet, target_layer="layer4")(images, labels)

By name: ``build_cam_method("gradcam", model, scales=[1.0, 0.5], flip=True)``, any key
of :data:`CAM_METHODS` or ``ensemble``; stage 2 calls it with ``conf/cam/*.yaml``'s
``cam.method``, ``cam.target_layer``, ``cam.scales`` and ``cam.flip``.
"""

from camseg.cam.base import CamMethod, eval_mode, normalize_cams
from camseg.cam.cam import CAM
from camseg.cam.crf import CRFConfig, crf_refine
from camseg.cam.ensemble import Ensemble
from camseg.cam.factory import CAM_METHODS, build_cam_method
from camseg.cam.gradient import GradCAM, GradCAMPlusPlus, GradientCamMethod, LayerCAM
from camseg.cam.layers import ActivationsAndGrads, default_target_layer, resolve_target_layer
from camseg.cam.policy import PseudoMaskPolicy, remove_small_components, threshold_cams
from camseg.cam.scorecam import ScoreCAM
from camseg.cam.threshold_sweep import ThresholdSweep, sweep_thresholds
from camseg.cam.tta import MultiScaleCAM

__all__ = [
    "CAM",
    "CAM_METHODS",
    "ActivationsAndGrads",
    "CRFConfig",
    "CamMethod",
    "Ensemble",
    "GradCAM",
    "GradCAMPlusPlus",
    "GradientCamMethod",
    "LayerCAM",
    "MultiScaleCAM",
    "PseudoMaskPolicy",
    "ScoreCAM",
    "ThresholdSweep",
    "build_cam_method",
    "crf_refine",
    "default_target_layer",
    "eval_mode",
    "normalize_cams",
    "remove_small_components",
    "resolve_target_layer",
    "sweep_thresholds",
    "threshold_cams",
]
