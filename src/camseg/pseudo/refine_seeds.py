"""The seeds the affinity net learns from: ``pseudo.affinity.seeds`` (see docs/refine.md).

``source: crf`` (PSA): each training sample's CAMs go through the dense CRF twice, with a
low background power (a strong background: its foreground is the confident foreground)
and a high one (a weak background: its background is the confident background); the rest
is ignored (:func:`camseg.refine.seeds.combine_seeds`). ``source: masks``: stage 2's own
masks, as before this option. Seed masks are written atomically to
``pseudo/affinity/seeds/<id>.png`` (a rerun reuses them) and summarised, against the
ground truth where it exists, in ``pseudo/affinity/seeds.json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from camseg.cam.crf import CRFConfig, CRFPool, crf_refine, default_crf_workers
from camseg.constants import BACKGROUND, IGNORE_INDEX
from camseg.errors import ConfigError
from camseg.refine.seeds import combine_seeds
from camseg.rundir import RunDir
from camseg.utils.io import read_image, read_json, read_mask, save_png_atomic, write_json_atomic
from camseg.utils.large import resize_area, resize_nearest

SOURCES = ("crf", "masks")
_CHUNK = 16  # samples per CRF pool round


@dataclasses.dataclass(frozen=True)
class SeedConfig:
    """``pseudo.affinity.seeds``: where the affinity net's confident pixels come from.

    Attributes:
        source: ``crf`` (two CRF views of the CAMs, PSA) or ``masks`` (stage 2's masks).
        fg_bg_power, bg_bg_power: background powers of the confident-foreground and the
            confident-background CRF views (``fg_bg_power < bg_bg_power``).
        band: background seeds closer than this fraction of the image side to a
            foreground seed are ignored.
        crf: the CRF's kernels (its ``bg_power`` is replaced by the two above).
    """

    source: str = "crf"
    fg_bg_power: float = 0.125
    bg_bg_power: float = 1.0
    band: float = 0.0
    crf: CRFConfig = dataclasses.field(default_factory=CRFConfig)

    @classmethod
    def from_cfg(cls, node: Any) -> SeedConfig:
        """From the config node (None: stage 2's masks, the behaviour before seeds)."""
        if node is None:
            return cls(source="masks")
        plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        raw: dict[str, Any] = {str(k): v for k, v in dict(plain).items()}  # type: ignore[arg-type]
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"pseudo.affinity.seeds: unknown keys {sorted(unknown)}")
        crf = raw.pop("crf", None) or {}
        seeds = cls(**raw, crf=CRFConfig(**{**dict(crf), "bg_power": 1.0}))
        seeds.check()
        return seeds

    def check(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(
                f"pseudo.affinity.seeds.source={self.source!r}: use one of {list(SOURCES)}"
            )
        if not 0 < self.fg_bg_power < self.bg_bg_power:
            raise ConfigError(
                f"pseudo.affinity.seeds: fg_bg_power={self.fg_bg_power} must be > 0 and below "
                f"bg_bg_power={self.bg_bg_power} (the confident-foreground view has the stronger background)"
            )
        if not 0.0 <= self.band < 0.5:
            raise ConfigError(f"pseudo.affinity.seeds.band={self.band}: must be in [0, 0.5)")

    def describe(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["crf"].pop("bg_power")
        return out


def seed_masks(
    cams: torch.Tensor,
    present: torch.Tensor,
    images: torch.Tensor,
    seeds: SeedConfig,
    pool: CRFPool,
) -> torch.Tensor:
    """Seeds (B,H,W) uint8 of CAMs (B,K,H,W) in [0,1] and their images (B,C,H,W) uint8."""
    low = dataclasses.replace(seeds.crf, bg_power=seeds.fg_bg_power)
    high = dataclasses.replace(seeds.crf, bg_power=seeds.bg_bg_power)
    fg_view = crf_refine(cams, present, images, low, pool)
    bg_view = crf_refine(cams, present, images, high, pool)
    band = round(seeds.band * float(np.sqrt(cams.shape[-2] * cams.shape[-1])))
    return combine_seeds(fg_view, bg_view, present, band)


def write_seeds(
    run: RunDir, seeds: SeedConfig, items: list[Any], crf_workers: int | None
) -> dict[str, Path]:
    """Seed PNGs for the training samples ``items`` (with ``id``, ``image``, ``mask``); their
    paths by sample id. Stage 2's mask paths for ``source: masks``."""
    masks = run.pseudo / "masks"
    if seeds.source == "masks":
        return {it.id: masks / f"{it.id}.png" for it in items}
    out = run.pseudo / "affinity" / "seeds"
    out.mkdir(parents=True, exist_ok=True)
    paths = {it.id: out / f"{it.id}.png" for it in items}
    todo = [it for it in items if not paths[it.id].is_file()]
    workers = default_crf_workers() if crf_workers is None else crf_workers
    with CRFPool(workers) as pool:
        for start in range(0, len(todo), _CHUNK):
            for shape, group in _by_shape(run, todo[start : start + _CHUNK]).items():
                cams = torch.stack([g[1] for g in group])
                present = torch.stack([g[2] for g in group])
                images = torch.stack([_image_tensor(g[0].image, *shape) for g in group])
                seed = seed_masks(cams, present, images, seeds, pool).numpy()
                for (it, _, _), mask in zip(group, seed, strict=True):
                    full = read_image(it.image).shape[:2]
                    save_png_atomic(paths[it.id], resize_nearest(mask, *full))
    write_json_atomic(run.pseudo / "affinity" / "seeds.json", _summary(seeds, items, paths))
    return paths


def _by_shape(run: RunDir, items: list[Any]) -> dict[tuple[int, int], list[Any]]:
    groups: dict[tuple[int, int], list[Any]] = {}
    for it in items:
        with np.load(run.pseudo / "cams" / f"{it.id}.npz") as z:
            cams = torch.from_numpy(z["cams"].astype(np.float32))
        labels = read_json(run.pseudo / "rows" / f"{it.id}.json")["labels"]
        present = torch.tensor(labels, dtype=torch.bool)
        shape = (int(cams.shape[-2]), int(cams.shape[-1]))
        groups.setdefault(shape, []).append((it, cams, present))
    return groups


def _image_tensor(path: Path, height: int, width: int) -> torch.Tensor:
    small = resize_area(read_image(path), height, width)
    small = small if small.ndim == 3 else small[..., None]
    return torch.from_numpy(np.ascontiguousarray(small)).permute(2, 0, 1)


def _summary(seeds: SeedConfig, items: list[Any], paths: dict[str, Path]) -> dict[str, Any]:
    """Seed fractions and, where a ground-truth mask exists, how often the seeds are right."""
    counts = np.zeros(3, np.int64)  # background, foreground, ignore seed pixels
    right = np.zeros(2, np.int64)  # background seeds on GT background, fg seeds on GT class
    judged = np.zeros(3, np.int64)  # background seeds, foreground seeds, GT foreground
    for it in items:
        seed = read_mask(paths[it.id])
        bg, ig = seed == BACKGROUND, seed == IGNORE_INDEX
        fg = ~bg & ~ig
        counts += [bg.sum(), fg.sum(), ig.sum()]
        if it.mask is not None:
            gt = read_mask(it.mask)
            right += [(bg & (gt == BACKGROUND)).sum(), (fg & (gt == seed)).sum()]
            judged += [bg.sum(), fg.sum(), ((gt != BACKGROUND) & (gt != IGNORE_INDEX)).sum()]
    total = max(int(counts.sum()), 1)
    return {
        "seeds": seeds.describe(),
        "samples": len(items),
        "background_fraction": float(counts[0] / total),
        "foreground_fraction": float(counts[1] / total),
        "ignore_fraction": float(counts[2] / total),
        "background_precision": float(right[0] / judged[0]) if judged[0] else None,
        "foreground_precision": float(right[1] / judged[1]) if judged[1] else None,
        "foreground_recall": float(right[1] / judged[2]) if judged[2] else None,
    }
