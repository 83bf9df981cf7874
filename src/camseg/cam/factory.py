"""The registry of CAM methods, and building one (or an ensemble, with TTA) by name."""

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

#: Every config name (``cam.method``) -> its class; each class declares its names.
CAM_METHODS: dict[str, type[CamMethod]] = {
    alias: cls
    for cls in (CAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM)
    for alias in (cls.name, *cls.aliases)
}


def _build_one(
    name: str, model: nn.Module, options: dict[str, Any], shared: Mapping[str, Any]
) -> CamMethod:
    key = name.lower()
    if key not in CAM_METHODS:
        raise ConfigError(
            f"cam.method='{name}': unknown CAM method; use one of {[*CAM_METHODS, 'ensemble']}"
        )
    cls = CAM_METHODS[key]
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        allowed = [p for p in accepted if p not in ("self", "model")]
        raise ConfigError(f"cam: '{name}' does not take {unknown}; its options are {allowed}")
    return cls(model, **{k: v for k, v in shared.items() if k in accepted}, **options)


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
    shared: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> CamMethod:
    """A CAM method by name, optionally ensembled and wrapped in multi-scale/flip TTA.

    Args:
        name: a key of :data:`CAM_METHODS`, or ``ensemble``.
        model: the classifier.
        scales: if given (or ``flip``), wrap in :class:`MultiScaleCAM` with these scales.
        flip: add horizontally flipped views (wraps in :class:`MultiScaleCAM`).
        size_divisor: see :class:`MultiScaleCAM`.
        methods: for ``ensemble``: names, or mappings ``{name: ..., **options}``.
        fusion, weights: for ``ensemble``, see :class:`Ensemble`.
        shared: options given to each method that takes them and skipped by the others,
            such as one ``target_layer`` or ``batch_size`` for a whole ensemble.
        **kwargs: options of the method (``target_layer``, ``relu``, ``batch_size``,
            ``multilabel``), refused by a method that does not take them, except
            ``multilabel``, which is shared.

    Stage 2 calls it with ``cfg.cam`` (``conf/cam/*.yaml``): ``method``, ``scales``, ``flip``,
    ``shared={"target_layer": ..., "batch_size": ..., "multilabel": ...}``.
    """
    shared = dict(shared or {})
    if "multilabel" in kwargs:
        shared["multilabel"] = kwargs.pop("multilabel")
    if name.lower() == "ensemble":
        if not methods:
            raise ConfigError("cam.methods: cam.method=ensemble needs a list of methods")
        members = []
        for spec in methods:
            entry = {"name": spec} if isinstance(spec, str) else dict(spec)
            if "name" not in entry:
                raise ConfigError(f"cam.methods: entry {entry} has no 'name'")
            options = {**kwargs, **entry}
            members.append(_build_one(str(options.pop("name")), model, options, shared))
        method: CamMethod = Ensemble(members, fusion=fusion, weights=weights)
    else:
        method = _build_one(name, model, dict(kwargs), shared)
    if scales is not None or flip:
        method = MultiScaleCAM(
            method, scales=scales or (1.0,), flip=flip, size_divisor=size_divisor
        )
    return method
