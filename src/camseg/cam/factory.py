"""Build CAM methods by name, for configs (``_target_: camseg.cam.build_cam_method``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from camseg.cam.base import CamMethod
from camseg.cam.cam import CAM
from camseg.cam.ensemble import Ensemble
from camseg.cam.gradient import GradCAM, GradCAMPlusPlus, LayerCAM
from camseg.cam.scorecam import ScoreCAM
from camseg.cam.tta import MultiScaleCAM
from camseg.errors import ConfigError

CAM_METHODS: dict[str, type[CamMethod]] = {
    "cam": CAM,
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "gradcampp": GradCAMPlusPlus,
    "layercam": LayerCAM,
    "scorecam": ScoreCAM,
}


def _build_one(name: str, model: nn.Module, kwargs: dict[str, Any]) -> CamMethod:
    key = name.lower()
    if key not in CAM_METHODS:
        raise ConfigError(
            f"cam.name='{name}': unknown CAM method; use one of {[*CAM_METHODS, 'ensemble']}"
        )
    cls = CAM_METHODS[key]
    accepted = inspect.signature(cls.__init__).parameters
    # `multilabel` only matters to score-based methods: configs may set it for all.
    if "multilabel" in kwargs and "multilabel" not in accepted:
        kwargs = {k: v for k, v in kwargs.items() if k != "multilabel"}
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        allowed = [p for p in accepted if p not in ("self", "model")]
        raise ConfigError(f"cam: '{name}' does not take {unknown}; its options are {allowed}")
    return cls(model, **kwargs)


def build_cam_method(
    name: str,
    model: nn.Module,
    *,
    scales: Sequence[float] | None = None,
    flip: bool = False,
    size_divisor: int = 1,
    methods: Sequence[str | Mapping[str, Any]] | None = None,
    fusion: str = "mean",
    weights: Sequence[float] | None = None,
    **kwargs: Any,
) -> CamMethod:
    """A CAM method by name, optionally ensembled and wrapped in multi-scale/flip TTA.

    Args:
        name: ``cam``, ``gradcam``, ``gradcam++``, ``layercam``, ``scorecam`` or
            ``ensemble``.
        model: the classifier.
        scales: if given (or ``flip``), wrap in :class:`MultiScaleCAM` with these scales.
        flip: add horizontally flipped views (wraps in :class:`MultiScaleCAM`).
        size_divisor: see :class:`MultiScaleCAM`.
        methods: for ``ensemble``: names, or mappings ``{name: ..., **options}``.
        fusion, weights: for ``ensemble``, see :class:`Ensemble`.
        **kwargs: options of the method (``target_layer``, ``relu``, ``batch_size``,
            ``multilabel``); ``multilabel`` is dropped for methods it does not concern.

    Example (Hydra)::

        cam:
          _target_: camseg.cam.build_cam_method
          name: gradcam
          target_layer: encoder.body.7
          scales: [1.0, 0.5, 1.5, 2.0]
          flip: true
    """
    if name.lower() == "ensemble":
        if not methods:
            raise ConfigError("cam.methods: name=ensemble needs a list of methods")
        members = []
        for spec in methods:
            if isinstance(spec, str):
                members.append(_build_one(spec, model, dict(kwargs)))
            else:
                options = {**kwargs, **dict(spec)}
                if "name" not in options:
                    raise ConfigError(f"cam.methods: entry {dict(spec)} has no 'name'")
                members.append(_build_one(str(options.pop("name")), model, options))
        method: CamMethod = Ensemble(members, fusion=fusion, weights=weights)
    else:
        method = _build_one(name, model, dict(kwargs))
    if scales is not None or flip:
        method = MultiScaleCAM(
            method, scales=scales or (1.0,), flip=flip, size_divisor=size_divisor
        )
    return method
