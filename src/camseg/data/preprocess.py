"""The preprocessing record: how pixels become a network input, saved with every model.

One :class:`Preprocessing` is built from the data config (``CamSegDataModule.preprocess``)
and used by the DataModule's evaluation batches, stored as plain data in the classifier's
and the segmenter's checkpoint hyper-parameters (key ``preprocess``), and applied as
stored by ``camseg-predict`` and ``camseg-cam``. It holds: the network input size, the
input channels and 2.5D context slices, the normalisation, the CT windows that turned
Hounsfield units into the training images (for NIfTI and DICOM input), and the class
names.

Numpy only (cv2 imported where used): ``camseg-predict --help`` imports this module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from camseg.errors import CamsegError, ConfigError, DatasetError

# The window maths lives with the converters, whose package imports matplotlib: imported
# where used (and the converters import this module: no cycle at import time).
if TYPE_CHECKING:
    from camseg.data.prepare.windowing import CtWindow

log = logging.getLogger(__name__)

#: The hyper-parameter key that holds the record in a checkpoint.
RECORD_KEY = "preprocess"
VERSION = 1
_FIELDS = (
    "version",
    "image_size",
    "in_channels",
    "context_slices",
    "mean",
    "std",
    "windows",
    "class_names",
)
# What a checkpoint from before the record is assumed to have used, named in the warning.
LEGACY_WINDOWS = {1: ("brain",), 3: ("brain", "subdural", "bone")}
LEGACY_CLASSIFIER = {"image_size": 128, "mean": [0.5], "std": [0.25]}


class PreprocessError(CamsegError):
    """A preprocessing record (from a config or a checkpoint) that cannot be applied."""


def display_slice(canonical_xy: np.ndarray) -> np.ndarray:
    """RAS+ axial slice ``A[x, y]`` -> image with row 0 anterior, column 0 patient right."""
    return canonical_xy.T[::-1, ::-1]


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """(H,W) or (H,W,C) uint8 -> (H,W,channels): grey repeated, RGB averaged to grey."""
    if img.ndim == 2:
        img = img[..., None]
    c = img.shape[2]
    if c == channels:
        return img
    if channels == 1:
        return img.mean(axis=2, keepdims=True).round().astype(np.uint8)
    if c == 1:
        return np.repeat(img, channels, axis=2)
    raise DatasetError(
        f"cannot turn a {c}-channel image into {channels} channels; set data.in_channels to 1 or {c}"
    )


def context_indices(position: int, count: int, context_slices: int) -> list[int]:
    """Slices ``position-k .. position+k`` of a volume of ``count`` slices, clamped at its edges."""
    return [
        min(max(position + d, 0), count - 1) for d in range(-context_slices, context_slices + 1)
    ]


def _windows(spec: Any, where: str) -> tuple[CtWindow, ...]:
    """Names, ``C/W`` strings, or ``{name, center, width}`` mappings -> windows (empty: none)."""
    from camseg.data.prepare.windowing import CtWindow, parse_windows

    if spec is None or spec == [] or spec == ():
        return ()
    if isinstance(spec, str) or all(isinstance(w, str) for w in spec):
        try:
            return parse_windows(spec)
        except ConfigError as e:
            raise PreprocessError(str(e).replace("--windows", where)) from None
    out = []
    for w in spec:
        if not isinstance(w, Mapping) or set(w) != {"name", "center", "width"}:
            raise PreprocessError(f"{where}: {w!r} is not a window {{name, center, width}}")
        name, center, width = w["name"], w["center"], w["width"]
        numbers = all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in (center, width)
        )
        if not isinstance(name, str) or not numbers or width <= 0:
            raise PreprocessError(f"{where}: {dict(w)!r} needs a name and numbers, width > 0")
        out.append(CtWindow(name, float(center), float(width)))
    if len(out) not in (1, 3):
        raise PreprocessError(f"{where}: {len(out)} windows; a record holds 1 or 3")
    return tuple(out)


def _numbers(value: Any, where: str) -> tuple[float, ...]:
    values = value if isinstance(value, list | tuple) else [value]
    if not values or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        raise PreprocessError(f"{where}={value!r} is not a number or a list of numbers")
    return tuple(float(v) for v in values)


def _count(value: Any, where: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise PreprocessError(f"{where}={value!r} is not an integer >= {lo}")
    return value


@dataclass(frozen=True)
class Preprocessing:
    """How an image (or a CT slice) becomes the network's input.

    Attributes:
        image_size: the network input side; images are resized to it (bilinear).
        in_channels: network input channels, ``channels * (2 * context_slices + 1)``.
        context_slices: 2.5D input: neighbouring slices on each side stacked as channels.
        mean, std: normalisation of [0,1] intensities, one value or one per slice channel.
        windows: CT windows (HU -> uint8) that made the training images; applied to NIfTI
            and DICOM input. Empty: the model was not trained on windowed CT.
        class_names: the K foreground classes, in output order (empty: not known).
    """

    image_size: int
    in_channels: int
    context_slices: int = 0
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    windows: tuple[CtWindow, ...] = ()
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.check("data.")

    def check(self, prefix: str) -> None:
        """Refuse inconsistent fields; messages name them as ``<prefix><field>``."""
        _count(self.image_size, f"{prefix}image_size", 1)
        _count(self.in_channels, f"{prefix}in_channels", 1)
        _count(self.context_slices, f"{prefix}context_slices", 0)
        views = self.views
        if self.in_channels % views:
            raise PreprocessError(
                f"{prefix}in_channels={self.in_channels} is not a multiple of the {views} slices "
                f"of {prefix}context_slices={self.context_slices}"
            )
        base = self.channels
        if len(self.mean) not in (1, base) or len(self.std) not in (1, base):
            raise PreprocessError(
                f"{prefix}mean/std need 1 or {base} values, got {len(self.mean)}/{len(self.std)}"
            )
        if any(s == 0 for s in self.std):
            raise PreprocessError(f"{prefix}std={list(self.std)} has a zero")
        if self.windows and len(self.windows) != base:
            raise PreprocessError(
                f"{prefix}windows: {len(self.windows)} window(s) but {base} channel(s) per slice"
            )

    # -- derived -----------------------------------------------------------------------
    @property
    def views(self) -> int:
        """Slices per input: ``2 * context_slices + 1``."""
        return 2 * self.context_slices + 1

    @property
    def channels(self) -> int:
        """Channels of one slice."""
        return self.in_channels // self.views

    def scale(self) -> tuple[np.ndarray, np.ndarray]:
        """Per input channel ``(mean, std)`` in uint8 units, (in_channels,) each."""
        m = np.broadcast_to(np.asarray(self.mean, np.float32), (self.channels,))
        s = np.broadcast_to(np.asarray(self.std, np.float32), (self.channels,))
        return np.tile(m, self.views) * 255.0, np.tile(s, self.views) * 255.0

    def describe(self) -> str:
        """One line naming every value, for warnings and logs."""
        wins = ",".join(f"{w.name} {w.center:g}/{w.width:g}" for w in self.windows) or "none"
        return (
            f"image_size={self.image_size}, in_channels={self.in_channels}, "
            f"context_slices={self.context_slices}, mean={list(self.mean)}, std={list(self.std)}, "
            f"windows={wins}"
        )

    # -- applying it ---------------------------------------------------------------------
    def normalise(self, images: np.ndarray) -> np.ndarray:
        """uint8 (..., in_channels) -> float32 ``(x - 255 mean) / (255 std)``."""
        mean, std = self.scale()
        return (images.astype(np.float32) - mean) / std

    def to_input(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 (H,W,in_channels) images of any sizes -> float32 (N,in_channels,S,S).

        Resized like the DataModule's evaluation batches (bilinear, ``cv2.INTER_LINEAR``,
        which albumentations' ``Resize`` uses), then normalised.
        """
        import cv2

        s = self.image_size
        out = []
        for im in images:
            if im.ndim != 3 or im.shape[2] != self.in_channels:
                raise PreprocessError(
                    f"an input of shape {im.shape}; the model takes (H,W,{self.in_channels})"
                )
            r = cv2.resize(im, (s, s), interpolation=cv2.INTER_LINEAR)
            out.append(r[..., None] if r.ndim == 2 else r)
        x = self.normalise(np.stack(out)) if out else np.zeros((0, s, s, self.in_channels))
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)

    def image_planes(self, image: np.ndarray, name: str) -> np.ndarray:
        """A 2D image file's pixels (H,W) or (H,W,3) -> uint8 (H,W,in_channels).

        Raises:
            PreprocessError: a 2.5D model (it needs the neighbouring slices of a volume),
                or a channel count the training data could not have had.
        """
        if self.context_slices:
            raise PreprocessError(self.refuse_2d(name))
        try:
            return to_channels(image, self.channels)
        except DatasetError:
            c = 1 if image.ndim == 2 else image.shape[2]
            raise PreprocessError(
                f"{name}: a {c}-channel image, but the model takes {self.channels} channel(s) "
                "per slice (grey or RGB images are converted; others are not)"
            ) from None

    def refuse_2d(self, name: str) -> str:
        return (
            f"{name}: the model is 2.5D (context_slices={self.context_slices}: each input stacks "
            f"{self.views} neighbouring slices) and a 2D image has no neighbours; give a NIfTI "
            "volume or a DICOM series instead"
        )

    def refuse_volume(self) -> str:
        return (
            "the model records no CT windows (it was not trained on windowed CT); give 2D "
            "images, or windows=... to say how Hounsfield units map to its input"
        )

    def volume_inputs(self, slices_hu: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Display-oriented HU slices (Z of (H,W)) -> Z inputs uint8 (H,W,in_channels).

        Each slice goes through the recorded windows, then stacks its clamped neighbours.
        """
        from camseg.data.prepare.windowing import apply_windows

        if not self.windows:
            raise PreprocessError(self.refuse_volume())
        planes = []
        for hu in slices_hu:
            p = apply_windows(hu, self.windows)
            planes.append(p[..., None] if p.ndim == 2 else p)
        n = len(planes)
        return [
            np.concatenate([planes[j] for j in context_indices(z, n, self.context_slices)], axis=2)
            for z in range(n)
        ]

    # -- plain data ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain containers only (loads with ``weights_only=True``; no ``_target_``)."""
        return {
            "version": VERSION,
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "context_slices": self.context_slices,
            "mean": list(self.mean),
            "std": list(self.std),
            "windows": [
                {"name": w.name, "center": w.center, "width": w.width} for w in self.windows
            ],
            "class_names": list(self.class_names),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "preprocess") -> Preprocessing:
        """The record :meth:`to_dict` wrote, every field checked; ``where`` starts messages."""
        if not isinstance(d, Mapping):
            raise PreprocessError(f"{where}: {type(d).__name__}, not a mapping")
        extra = sorted(str(k) for k in d if k not in _FIELDS)
        if extra:
            raise PreprocessError(f"{where}: unknown field(s) {extra}; known: {list(_FIELDS)}")
        version = d.get("version", VERSION)
        if version != VERSION:
            raise PreprocessError(
                f"{where}.version={version!r}: this camseg reads version {VERSION}; upgrade camseg"
            )
        names = d.get("class_names", [])
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise PreprocessError(f"{where}.class_names={names!r} is not a list of names")
        for key in ("image_size", "in_channels"):
            if key not in d:
                raise PreprocessError(f"{where}: no {key}")
        record = cls.__new__(cls)
        fields = {
            "image_size": _count(d["image_size"], f"{where}.image_size", 1),
            "in_channels": _count(d["in_channels"], f"{where}.in_channels", 1),
            "context_slices": _count(d.get("context_slices", 0), f"{where}.context_slices", 0),
            "mean": _numbers(d.get("mean", [0.5]), f"{where}.mean"),
            "std": _numbers(d.get("std", [0.25]), f"{where}.std"),
            "windows": _windows(d.get("windows"), f"{where}.windows"),
            "class_names": tuple(names),
        }
        for k, v in fields.items():
            object.__setattr__(record, k, v)
        record.check(f"{where}.")
        return record

    @classmethod
    def from_config(
        cls,
        image_size: int,
        in_channels: int,
        context_slices: int = 0,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.25,),
        windows: Any = None,
        class_names: Sequence[str] = (),
    ) -> Preprocessing:
        """From ``data.*`` values; errors name ``data.<key>`` and are :class:`ConfigError`."""
        try:
            return cls(
                int(image_size),
                int(in_channels),
                int(context_slices),
                _numbers(list(mean), "data.mean"),
                _numbers(list(std), "data.std"),
                _windows(windows, "data.windows"),
                tuple(class_names),
            )
        except PreprocessError as e:
            raise ConfigError(str(e)) from None


def from_hparams(
    hp: Mapping[str, Any],
    label: str,
    legacy: Mapping[str, Any] | None = None,
    warn: Callable[[str], None] = log.warning,
) -> Preprocessing:
    """The record stored in a checkpoint's hyper-parameters.

    A checkpoint from before the record falls back, with one warning that names every
    assumed value, to what the file or its run still tell: a segmenter's ``data_config``,
    or ``legacy`` (a classifier's run config ``data`` section, else 128 px, mean 0.5,
    std 0.25); CT windows are assumed brain (1 channel per slice) or brain, subdural,
    bone (3 channels), as camseg-predict did before.

    Raises:
        PreprocessError: a stored record that does not validate (one line naming ``label``).
    """
    names = [str(n) for n in hp.get("class_names", [])]
    if RECORD_KEY in hp and hp[RECORD_KEY] is not None:
        record = Preprocessing.from_dict(hp[RECORD_KEY], f"{label}: {RECORD_KEY}")
        if record.class_names and names and list(record.class_names) != names:
            raise PreprocessError(
                f"{label}: {RECORD_KEY}.class_names={list(record.class_names)} but class_names={names}"
            )
        return record if record.class_names else replace(record, class_names=tuple(names))
    net = hp.get("net_config") or {}
    if isinstance(hp.get("data_config"), Mapping):
        source, d = "its data_config", dict(hp["data_config"])
    elif legacy is not None:
        source, d = "its run's config.yaml", dict(legacy)
    else:
        source, d = "camseg's old defaults", dict(LEGACY_CLASSIFIER)
    d.setdefault("in_channels", net.get("in_channels", 3))
    ctx = d.get("context_slices", 0)
    channels = int(d["in_channels"]) // (2 * int(ctx) + 1) if isinstance(ctx, int) else 0
    fields = {k: d.get(k) for k in ("image_size", "in_channels", "mean", "std")}
    fields["context_slices"] = ctx
    fields["windows"] = list(LEGACY_WINDOWS.get(channels, ()))
    fields["class_names"] = names
    record = Preprocessing.from_dict(fields, f"{label}: {source}")
    warn(
        f"{label}: no preprocessing record (a checkpoint from an older camseg); assuming "
        f"{record.describe()} from {source}; retrain to record them"
    )
    return record


def record_datamodule(hparams: MutableMapping[str, Any], trainer: Any) -> None:
    """Store the fitting DataModule's record in a LightningModule's ``hparams`` (unless given).

    Called from the modules' ``setup``: the checkpoint Lightning writes then holds it.
    """
    if hparams.get(RECORD_KEY) is not None:
        return
    record = getattr(getattr(trainer, "datamodule", None), "preprocess", None)
    if isinstance(record, Preprocessing):
        hparams[RECORD_KEY] = record.to_dict()


def describe_windows(windows: Sequence[CtWindow]) -> str:
    """``"lung (-600/1500)"``: for messages."""
    return ", ".join(f"{w.name} ({w.center:g}/{w.width:g})" for w in windows) or "none"
