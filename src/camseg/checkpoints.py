"""Every checkpoint camseg reads goes through here: tensors and plain data, never code.

A checkpoint is read with ``torch.load(weights_only=True)`` and no fallback, so a pickle
that names a function (``os.system``, ``pathlib.Path.touch``) is refused before anything
in it runs. A network is rebuilt from camseg's own whitelist (``CamClassifier`` with
typed keyword arguments, or an smp architecture by name), never from a ``_target_`` read
from the file: the arguments are checked here (:func:`classifier_kwargs`,
:func:`segmenter_kwargs`), the networks built by ``camseg.models.classifier.build_classifier``
and ``camseg.models.segmenter.build_segmenter`` (this module sits below the models, which
read their local weight files through it). Every refusal is one :class:`CheckpointError`
line naming the file.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from camseg.constants import ENCODER_SOURCES as SOURCES
from camseg.constants import OUTPUT_STRIDES
from camseg.errors import CamsegError

CLASSIFIER = "classifier"
SEGMENTER = "segmenter"
AFFINITY = "affinity"
# Where each kind lives, for messages that name the right place.
PLACES = {
    CLASSIFIER: "a stage-1 classifier checkpoint such as runs/<run>/cls/checkpoints/best.ckpt",
    SEGMENTER: "a stage-3 segmenter checkpoint such as runs/<run>/seg/checkpoints/best.ckpt",
    AFFINITY: "a stage-2 affinity checkpoint such as runs/<run>/pseudo/affinity/checkpoints/last.ckpt",
}
CAM_CLASSIFIER_TARGET = "camseg.models.classifier.CamClassifier"
# Library names only: no ``hf-hub:``/``local-dir:`` prefixes, no paths.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"
# What Lightning needs to resume a fit (a weights-only save lacks the last two).
_RESUME_KEYS = ("state_dict", "loops", "optimizer_states")


class CheckpointError(CamsegError):
    """A checkpoint or weight file that is missing, damaged, unsafe or of the wrong kind."""


def load_checkpoint(path: str | Path, label: str | None = None, fix: str | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line errors.

    Args:
        path: the file.
        label: how the user named it (``ckpt_path=...``), used to start every message.
        fix: what to do when the file is damaged (appended to that message).

    Raises:
        CheckpointError: missing, empty, truncated, not a torch file, or holding Python
            objects other than tensors and plain data (refused unrun).
    """
    path = Path(path)
    label = label or str(path)
    if not path.exists():
        raise CheckpointError(f"{label}: file not found")
    if not path.is_file():
        raise CheckpointError(f"{label}: not a file")
    with open(path, "rb") as f:
        head = f.read(4)
    tail = f"; {fix}" if fix else ""
    if not head:
        raise CheckpointError(f"{label}: empty file (0 bytes), not a checkpoint{tail}")
    if not head.startswith((_ZIP_MAGIC, _PICKLE_PROTO)):
        raise CheckpointError(f"{label}: not a torch checkpoint (it does not start like one){tail}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{label}: truncated or corrupt checkpoint{tail}") from None
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"names {named.group(1)}" if named else "is not tensors and plain data"
        raise CheckpointError(
            f"{label}: refused: its pickle {what}; camseg loads only tensors and plain data "
            "(weights_only=True) and never runs code from a file"
        ) from None
    except Exception as e:  # whatever else torch.load meets in a damaged file, it is one line
        text = str(e).strip()
        why = text.splitlines()[0].split(". ")[0][:120] if text else type(e).__name__
        raise CheckpointError(f"{label}: truncated or corrupt checkpoint ({why}){tail}") from None


def checkpoint_kind(ckpt: Any) -> str | None:
    """``CLASSIFIER``, ``SEGMENTER`` or None (not a camseg checkpoint)."""
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or not isinstance(ckpt.get("state_dict"), Mapping):
        return None
    net = hp.get("net_config")
    if not isinstance(net, dict) or "class_names" not in hp:
        return None
    if hp.get("kind") == AFFINITY:  # stage 2's affinity net (camseg.refine)
        return AFFINITY
    if "arch" in net:
        return SEGMENTER if isinstance(hp.get("data_config"), dict) else None
    return CLASSIFIER


def read_checkpoint(
    path: str | Path, kind: str, label: str | None = None, fix: str | None = None
) -> dict[str, Any]:
    """A camseg checkpoint of ``kind``; any other file is refused in one line."""
    label = label or str(path)
    ckpt = load_checkpoint(path, label, fix)
    found = checkpoint_kind(ckpt)
    if found == kind:
        return ckpt
    if found is not None:
        raise CheckpointError(
            f"{label}: a camseg {found} checkpoint, not a {kind}; give {PLACES[kind]}"
        )
    raise CheckpointError(
        f"{label}: not a camseg {kind} checkpoint (no state_dict, or no net_config/class_names "
        f"in its hyper-parameters); give {PLACES[kind]}"
    )


def check_resumable(ckpt: Mapping[str, Any], label: str) -> None:
    """Refuse, before Lightning reads it, a file that cannot resume a fit."""
    missing = [k for k in _RESUME_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{label}: cannot resume training from it (no {', '.join(missing)}; not a full Lightning "
            "checkpoint, e.g. saved weights-only); give a last.ckpt written by camseg, or drop ckpt_path"
        )


def state_dict(
    ckpt: Mapping[str, Any], label: str, prefix: str = "net."
) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` in the checkpoint's ``state_dict``, prefix removed."""
    sd = ckpt.get("state_dict")
    out = {k[len(prefix) :]: v for k, v in (sd or {}).items() if str(k).startswith(prefix)}
    if not out or not all(isinstance(v, torch.Tensor) for v in out.values()):
        raise CheckpointError(f"{label}: its state_dict holds no '{prefix}*' tensors")
    return out


def load_weights(net: nn.Module, state: Mapping[str, torch.Tensor], label: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{label}: weights do not fit the network its config describes ({str(e).splitlines()[0]})"
        ) from None


def _int(cfg: Mapping[str, Any], key: str, label: str, lo: int = 1) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise CheckpointError(f"{label}: net_config.{key}={v!r} is not an integer >= {lo}")
    return v


def _name(cfg: Mapping[str, Any], key: str, label: str) -> str:
    v = cfg.get(key)
    if not isinstance(v, str) or not _NAME.match(v):
        raise CheckpointError(f"{label}: net_config.{key}={v!r} is not a library model name")
    return v


def _refuse_nested_targets(cfg: Mapping[str, Any], label: str, where: str = "net_config") -> None:
    """Hydra calls every nested ``_target_`` it meets: none may hide in a stored config."""
    for k, v in cfg.items():
        if isinstance(v, Mapping):
            if "_target_" in v:
                raise CheckpointError(
                    f"{label}: refused: {where}.{k}._target_={v['_target_']!r}; camseg never calls "
                    "a target named in a file"
                )
            _refuse_nested_targets(v, label, f"{where}.{k}")


def _unknown(cfg: Mapping[str, Any], allowed: tuple[str, ...], label: str) -> None:
    extra = sorted(str(k) for k in cfg if k not in allowed)
    if extra:
        raise CheckpointError(
            f"{label}: net_config has keys camseg does not build from ({', '.join(extra)})"
        )


def classifier_kwargs(net_config: Mapping[str, Any], label: str) -> dict[str, Any]:
    """Validated ``CamClassifier`` arguments from a stored ``net_config`` (weights not loaded:
    ``pretrained=False``, the checkpoint holds them)."""
    allowed = (
        "_target_",
        "num_classes",
        "backbone",
        "source",
        "in_channels",
        "output_stride",
        "pretrained",
        "dropout",
    )
    _refuse_nested_targets(net_config, label)
    target = net_config.get("_target_", CAM_CLASSIFIER_TARGET)
    if target != CAM_CLASSIFIER_TARGET:
        raise CheckpointError(
            f"{label}: refused: net_config._target_={target!r}; camseg rebuilds only "
            f"{CAM_CLASSIFIER_TARGET} and never calls a target named in a file"
        )
    _unknown(net_config, allowed, label)
    source = net_config.get("source", "torchvision")
    if source not in SOURCES:
        raise CheckpointError(
            f"{label}: net_config.source={source!r} is not one of {list(SOURCES)}"
        )
    stride = net_config.get("output_stride", 32)
    if stride not in OUTPUT_STRIDES or isinstance(stride, bool):
        raise CheckpointError(
            f"{label}: net_config.output_stride={stride!r} is not one of {list(OUTPUT_STRIDES)}"
        )
    dropout = net_config.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise CheckpointError(f"{label}: net_config.dropout={dropout!r} is not a number in [0, 1)")
    return {
        "num_classes": _int(net_config, "num_classes", label),
        "backbone": _name(net_config, "backbone", label),
        "source": source,
        "in_channels": _int({"in_channels": 3, **net_config}, "in_channels", label),
        "output_stride": int(stride),
        "pretrained": False,
        "dropout": float(dropout),
    }


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def segmenter_kwargs(net_config: Mapping[str, Any], label: str) -> dict[str, Any]:
    """Validated ``build_segmentation_net`` arguments (``encoder_weights=None``: the
    checkpoint holds the weights, nothing is downloaded)."""
    import segmentation_models_pytorch as smp

    allowed = (
        "arch",
        "encoder_name",
        "encoder_weights",
        "in_channels",
        "num_classes",
        "model_kwargs",
    )
    _refuse_nested_targets(net_config, label)
    _unknown(net_config, allowed, label)
    arch = net_config.get("arch")
    known = smp.MODEL_ARCHITECTURES_MAPPING
    if not isinstance(arch, str) or arch.lower() not in known:
        raise CheckpointError(
            f"{label}: net_config.arch={arch!r} is not a segmentation-models-pytorch architecture"
        )
    model_kwargs = net_config.get("model_kwargs") or {}
    if not isinstance(model_kwargs, dict) or not _plain(model_kwargs):
        raise CheckpointError(f"{label}: net_config.model_kwargs is not a dict of plain values")
    return {
        "arch": arch,
        "encoder_name": _name(net_config, "encoder_name", label),
        "encoder_weights": None,
        "in_channels": _int(net_config, "in_channels", label),
        "num_classes": _int(net_config, "num_classes", label),
        "model_kwargs": dict(model_kwargs),
    }


def plain_data(value: Any) -> Any:
    """``value`` with OmegaConf containers, numpy values and paths made plain Python, so a
    checkpoint holding it loads with ``weights_only=True`` (used when saving)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: plain_data(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(plain_data(v) for v in value)
    if isinstance(value, (list, tuple)):  # named tuples become lists
        return [plain_data(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def resume_context(path: str | Path, explicit: bool, stage: str) -> tuple[str, str]:
    """``(label, fix)`` for a checkpoint a stage resumes from: the user's ``ckpt_path=`` or
    the interrupted run's own ``last.ckpt`` (auto-resume), with the way to go on."""
    if explicit:
        return f"ckpt_path={path}", "give another checkpoint, or drop ckpt_path to start fresh"
    return (
        str(path),
        f"stage {stage} cannot resume from it: delete it to start the stage over, or run with force=true",
    )


def check_same_model(
    hp: Mapping[str, Any],
    class_names: list[str],
    net_config: Mapping[str, Any] | None,
    keys: tuple[str, ...],
    label: str,
    group: str,
) -> None:
    """Refuse, in one line, a checkpoint (its ``hyper_parameters``) trained for other classes,
    or whose ``keys`` of ``net_config`` differ from ours (a key we leave None is not compared);
    ``group``: the config group to go back to (``model``, ``seg``)."""
    if list(hp["class_names"]) != list(class_names):
        raise CheckpointError(
            f"{label}: checkpoint was trained for classes {list(hp['class_names'])} but the dataset "
            f"has {list(class_names)}; use the matching data config or another run_name"
        )
    theirs, ours = hp["net_config"], net_config or {}
    diff = [
        f"{k}: {theirs.get(k)} vs {ours.get(k)}"
        for k in keys
        if ours.get(k) is not None and theirs.get(k) != ours.get(k)
    ]
    if diff:
        raise CheckpointError(
            f"{label}: checkpoint is of another model ({', '.join(diff)}); "
            f"use the {group} config it was trained with or another run_name"
        )


def check_segmenter(
    path: str | Path,
    net_config: Mapping[str, Any],
    class_names: list[str],
    label: str | None = None,
    fix: str | None = None,
) -> dict[str, Any]:
    """The segmenter checkpoint at ``path``, refused in one line unless it is of the network
    ``net_config`` describes and of ``class_names``."""
    label = label or str(path)
    ckpt = read_checkpoint(path, SEGMENTER, label, fix)
    hp = ckpt["hyper_parameters"]
    segmenter_kwargs(hp["net_config"], label)
    keys = ("arch", "encoder_name", "in_channels", "num_classes")
    check_same_model(hp, class_names, net_config, keys, label, "seg")
    return ckpt


def segmenter_data_config(hp: Mapping[str, Any], label: str) -> dict[str, Any]:
    """The preprocessing record of a segmenter checkpoint, with its types checked."""
    d = dict(hp["data_config"])
    ctx = d.get("context_slices", 0)
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 0:
        raise CheckpointError(f"{label}: data_config.context_slices={ctx!r} is not an integer >= 0")
    size, channels = _int(d, "image_size", label), _int(d, "in_channels", label)
    if channels % (2 * ctx + 1):
        raise CheckpointError(
            f"{label}: data_config.in_channels={channels} is not a multiple of 2*context_slices+1"
        )
    for key in ("mean", "std"):
        v = d.get(key)
        values = v if isinstance(v, (list, tuple)) else [v]
        if not values or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in values
        ):
            raise CheckpointError(
                f"{label}: data_config.{key}={v!r} is not a number or list of numbers"
            )
        if key == "std" and any(x == 0 for x in values):
            raise CheckpointError(f"{label}: data_config.std={v!r} has a zero")
    names = hp.get("class_names")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{label}: class_names={names!r} is not a list of names")
    if len(names) != hp["net_config"].get("num_classes"):
        raise CheckpointError(
            f"{label}: {len(names)} class_names but net_config.num_classes="
            f"{hp['net_config'].get('num_classes')}"
        )
    return {**d, "context_slices": ctx, "image_size": size, "in_channels": channels}
