"""The audit's ``Trainer.predict`` module: CAMs and every per-map measure, batched on the device.

One batch: the classifier's scores, each method's CAMs for the classes present in the
labels (one map per (image, class) pair, upsampled to the input and normalised), then the
localisation, anatomy and faithfulness measures of all those maps at once. Only small
per-map rows (numbers) and the mean maps per class leave the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from camseg.audit import metrics as M
from camseg.audit.faithfulness import (
    FastScorer,
    baseline_images,
    class_scores,
    confidence_change,
    deletion_insertion,
)
from camseg.cam.base import CamMethod, normalize_cams

#: Side of the mean maps per class (the outcome focus), whatever the input size.
FOCUS_SIZE = 32


@dataclass(frozen=True)
class AuditSettings:
    """How the measures are taken (``audit.*``; see docs/audit.md)."""

    body_threshold: float = 0.1
    body_opening: float = 0.08
    border_band: float = 0.1
    corner_band: float = 0.2
    tolerance: float = 0.03
    steps: int = 16
    baseline: str = "mean"
    faithfulness: bool = True
    batch_size: int = 64
    mean: tuple[float, ...] = field(default=(0.5,))
    std: tuple[float, ...] = field(default=(0.25,))


class AuditPredictModule(L.LightningModule):
    """``predict_step`` -> ``{"rows": [...], "focus": {method: (K,2,S,S)}, "counts": (K,2),
    "map_sum": {method: (H,W)}}``.

    ``focus`` sums the maps of each true class over the images whose class the classifier
    predicts (index 0) or misses (1); ``counts`` counts those images. ``map_sum`` sums all
    the batch's maps (one per row) at the input's size, for the fixed-location test.

    Rows hold, per (image, class) pair and method: energy pointing, pointing game,
    out-of-body share, border and corner shares, the peak's corner, and (with
    ``faithfulness``) deletion/insertion AUC and the confidence change.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        engines: dict[str, CamMethod],
        multilabel: bool,
        settings: AuditSettings,
    ) -> None:
        super().__init__()
        self.model = model
        # Every forward but the CAMs' (scores, perturbed and multiplied images).
        self.scorer = FastScorer(model)
        self.engines = engines
        self.score = class_scores(multilabel)
        self.multilabel = multilabel
        self.s = settings

    def on_predict_start(self) -> None:
        self.model.eval()

    def _cams(self, engine: CamMethod, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Gradient methods need autograd even inside Lightning's inference mode (as stage 2).
        with torch.inference_mode(False), torch.enable_grad():
            cams = engine(images.clone(), labels.clone()).float()
        if cams.shape[-2:] != images.shape[-2:]:
            cams = F.interpolate(cams, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return normalize_cams(cams.clamp_min(0))

    def _predicted(self, probs: torch.Tensor) -> torch.Tensor:
        """(B,K) bool: the classes the classifier predicts (p >= 0.5, or the top class)."""
        if self.multilabel:
            return probs >= 0.5
        return F.one_hot(probs.argmax(dim=1), probs.shape[1]).bool()

    def _body(self, images: torch.Tensor) -> torch.Tensor:
        """(B,H,W) bool: the body, from the images with the input normalisation undone."""
        s = self.s
        mean = torch.tensor(s.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(s.std, device=images.device).view(1, -1, 1, 1)
        return M.body_mask((images * std + mean).mean(dim=1), s.body_threshold, s.body_opening)

    def _measures(
        self,
        images: torch.Tensor,
        maps: torch.Tensor,
        gt: torch.Tensor,
        body: torch.Tensor,
        pairs: tuple[torch.Tensor, torch.Tensor],
        probs: torch.Tensor,
        baseline: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """One method's per-map measures, on the device; ``body``, ``gt`` and ``maps`` are
        per (image, class) pair, ``pairs`` their image and class indices."""
        s = self.s
        b, k = pairs
        measures: dict[str, torch.Tensor] = {
            "energy_pointing": M.energy_pointing(maps, gt),
            "pointing_game": M.pointing_game(maps, gt, s.tolerance),
            "out_of_body": M.out_of_body_share(maps, body),
            "out_of_body_area": (~body).flatten(1).float().mean(dim=1),
            "peak_corner": M.peak_corner(maps, s.corner_band).float(),
        }
        if s.faithfulness:
            assert baseline is not None
            curves = deletion_insertion(
                self.scorer,
                images[b],
                maps,
                k,
                self.score,
                s.steps,
                baseline[b],
                s.batch_size,
                before=probs[b, k],
            )
            change = confidence_change(
                self.scorer, images[b], maps, k, self.score, s.batch_size, probs[b, k]
            )
            measures |= {
                "deletion_auc": curves.deletion_auc,
                "insertion_auc": curves.insertion_auc,
                "confidence_drop": change.drop,
                "average_drop": change.average_drop,
                "increase": change.increase,
            }
        return measures

    def predict_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Any]:
        images, labels = batch["image"], batch["labels"]
        s = self.s
        with torch.no_grad():
            probs = self.score(self.scorer(images).float())
        body = self._body(images)
        predicted = self._predicted(probs)
        pairs = (labels > 0.5).nonzero()
        b, k = pairs[:, 0], pairs[:, 1]
        gt = (batch["mask"][b] == (k + 1)[:, None, None]) & batch["has_mask"].to(images.device)[b][
            :, None, None
        ]
        h, w = images.shape[-2:]
        borders = M.border_regions(h, w, s.border_band, images.device)
        corners = M.corner_regions(h, w, s.corner_band, images.device)
        baseline = baseline_images(images, s.baseline) if s.faithfulness else None
        rows = _rows(batch, pairs, probs, predicted)
        focus: dict[str, torch.Tensor] = {}
        map_sum: dict[str, torch.Tensor] = {}
        pos = (labels > 0.5).float()
        counts = torch.stack(((pos * predicted).sum(0), (pos * ~predicted).sum(0)), dim=1).cpu()
        for name, engine in self.engines.items():
            cams = self._cams(engine, images, labels)
            maps = cams[b, k]
            small = F.adaptive_avg_pool2d(cams, FOCUS_SIZE)
            # Outcome focus: sums of the maps per true class, split by a correct / wrong top class.
            focus[name] = torch.stack(
                (
                    (small * (pos * predicted)[..., None, None]).sum(0),
                    (small * (pos * ~predicted)[..., None, None]).sum(0),
                ),
                dim=1,
            ).cpu()
            map_sum[name] = maps.double().sum(dim=0).cpu()
            if not len(pairs):
                continue
            measures = self._measures(images, maps, gt, body[b], (b, k), probs, baseline)
            shares = (M.region_shares(maps, borders), M.region_shares(maps, corners))
            _add_to_rows(rows, name, measures, shares)
        return {"rows": rows, "focus": focus, "counts": counts, "map_sum": map_sum}


def _rows(
    batch: dict[str, Any], pairs: torch.Tensor, probs: torch.Tensor, predicted: torch.Tensor
) -> list[dict[str, Any]]:
    """One row per (image, class) pair, its ``methods`` still empty."""
    return [
        {
            "id": batch["id"][int(i)],
            "group": batch["group"][int(i)],
            "class": int(c),
            "score": float(probs[i, c]),
            "predicted": bool(predicted[i, c]),
            "has_mask": bool(batch["has_mask"][int(i)]),
            "methods": {},
        }
        for i, c in pairs.tolist()
    ]


def _add_to_rows(
    rows: list[dict[str, Any]],
    name: str,
    measures: dict[str, torch.Tensor],
    shares: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Method ``name``'s measures and (border, corner) ``shares`` into each row, as numbers."""
    values = {key: v.cpu().tolist() for key, v in measures.items()}
    borders_l, corners_l = shares[0].cpu().tolist(), shares[1].cpu().tolist()
    for j, row in enumerate(rows):
        m = {key: v[j] for key, v in values.items()}
        m["peak_corner"] = int(m["peak_corner"])
        m["border_share"] = dict(zip(M.BORDERS, borders_l[j], strict=True))
        m["corner_share"] = dict(zip(M.CORNERS, corners_l[j], strict=True))
        row["methods"][name] = m
