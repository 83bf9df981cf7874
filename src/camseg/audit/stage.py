"""The ``audit`` stage: audit the stage-1 classifier's CAMs on a dataset, write audit.json.

Runs after stage 1 (``camseg stages=[audit]``, or inside the default pipeline) on
``runs/<name>/audit/``, and as ``camseg-audit`` on any classifier checkpoint and dataset
(:mod:`camseg.audit_cli`). The CAMs are those stage 2 would make: the same engine
(:func:`camseg.pseudo.stage.build_engine`, with ``cam.scales`` and ``cam.flip``), one per
method of ``audit.methods``, run through ``Trainer.predict`` in batches on the device.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from camseg import __version__, fingerprint
from camseg.audit.module import AuditPredictModule, AuditSettings
from camseg.audit.shortcut import ShortcutRule
from camseg.audit.summary import focus_summary, summarise_method
from camseg.cam.base import CamMethod
from camseg.cls.checkpoint import check_compatible, load_classifier
from camseg.cls.stage import build_datamodule
from camseg.data.datamodule import CamSegDataModule
from camseg.errors import ConfigError, DatasetError
from camseg.rundir import RunDir
from camseg.training import build_trainer
from camseg.utils.io import read_json, save_png_atomic, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

AUDIT_JSON = "audit.json"
SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test", "all")


def settings(cfg: DictConfig, dm: CamSegDataModule) -> tuple[AuditSettings, ShortcutRule]:
    """The measures' settings and the shortcut rule from ``cfg.audit``, checked."""
    a = cfg.get("audit") or {}
    s = AuditSettings(
        body_threshold=float(a.get("body_threshold", 0.1)),
        body_opening=float(a.get("body_opening", 0.08)),
        border_band=float(a.get("border_band", 0.1)),
        corner_band=float((a.get("shortcut") or {}).get("corner_band", 0.2)),
        tolerance=float(a.get("tolerance", 0.03)),
        steps=int(a.get("steps", 16)),
        baseline=str(a.get("baseline", "mean")),
        faithfulness=bool(a.get("faithfulness", True)),
        batch_size=int(a.get("batch_size", 64)),
        # One value per input channel (2.5D inputs stack the slice channels per view).
        mean=tuple(float(v) / 255.0 for v in dm.preprocess.scale()[0]),
        std=tuple(float(v) / 255.0 for v in dm.preprocess.scale()[1]),
    )
    if s.steps < 1 or s.batch_size < 1:
        raise ConfigError(f"audit.steps={s.steps}, audit.batch_size={s.batch_size}: must be >= 1")
    if s.baseline not in ("mean", "blur"):
        raise ConfigError(f"audit.baseline='{s.baseline}': use mean or blur")
    if not 0 < s.border_band <= 0.5 or not 0 <= s.tolerance <= 1:
        raise ConfigError(
            f"audit.border_band={s.border_band}, audit.tolerance={s.tolerance}: need 0 < band <= 0.5, 0 <= tolerance <= 1"
        )
    rule = ShortcutRule(**{k: float(v) for k, v in (a.get("shortcut") or {}).items()})
    return s, rule


def methods(cfg: DictConfig) -> list[str]:
    """``audit.methods``, or the configured ``cam.method`` when empty."""
    names = [str(m) for m in (OmegaConf.select(cfg, "audit.methods", default=None) or [])]
    return names or [str(cfg.cam.method)]


def build_engines(cfg: DictConfig, model: Any, multilabel: bool) -> dict[str, CamMethod]:
    """One stage-2 engine (TTA included) per audited method."""
    from camseg.pseudo.stage import build_engine

    engines = {}
    for name in methods(cfg):
        sub = OmegaConf.merge(cfg, {"cam": {"method": name}})
        if not OmegaConf.select(cfg, "audit.tta", default=True):
            sub = OmegaConf.merge(sub, {"cam": {"scales": [1.0], "flip": False}})
        engines[name] = build_engine(sub, model, multilabel)[0]  # type: ignore[arg-type]
    return engines


def choose_samples(dm: CamSegDataModule, split: str, max_images: int) -> list[str]:
    """Ids of the positive images of ``split``, evenly spread over the sorted ids (0 = all)."""
    if split not in SPLITS:
        raise ConfigError(f"audit.split='{split}': use one of {list(SPLITS)}")
    ids = sorted(s.id for s in dm.samples(split) if any(s.labels))
    if not ids:
        raise DatasetError(
            f"{dm.root}: the '{split}' split has no positive image to audit; set audit.split"
        )
    if 0 < max_images < len(ids):
        idx = np.linspace(0, len(ids) - 1, max_images).round().astype(int)
        ids = [ids[i] for i in sorted(set(idx.tolist()))]
    return ids


def _loader(cfg: DictConfig, dm: CamSegDataModule, split: str, ids: set[str]) -> DataLoader:
    """An unshuffled loader of the chosen images of ``split`` (no training augmentation)."""
    dataset = dm.dataset(split, train=False)
    dataset.items = [it for it in dataset.items if it.id in ids]
    return dm._loader(
        dataset,
        shuffle=False,
        batch_size=int(OmegaConf.select(cfg, "audit.batch_size", default=64)),
    )


def _headline(primary: str, m: dict[str, Any]) -> dict[str, Any]:
    """audit.json's ``headline``: the key numbers of the primary method's summary ``m``."""
    return {
        "method": primary,
        "energy_pointing": m["localisation"]["energy_pointing"],
        "pointing_game": m["localisation"]["pointing_game"],
        "out_of_body_share": m["anatomy"]["out_of_body_share"],
        "shortcut": m["shortcut"]["flagged"],
        "shortcut_corner": m["shortcut"]["corner"],
        "shortcut_reasons": m["shortcut"]["reasons"],
        "shortcut_causes": m["shortcut"]["causes"],
    }


def audit_dataset(cfg: DictConfig, ckpt: Path, dm: CamSegDataModule, out: Path) -> dict[str, Any]:
    """Audit the classifier of ``ckpt`` on ``dm``; return audit.json's content (not written)."""
    model, hp = load_classifier(ckpt)
    multilabel = bool(hp.get("multilabel", True))
    s, rule = settings(cfg, dm)
    split = str(OmegaConf.select(cfg, "audit.split", default="all"))
    ids = set(choose_samples(dm, split, int(OmegaConf.select(cfg, "audit.max_images", default=64))))
    engines = build_engines(cfg, model, multilabel)
    loader = _loader(cfg, dm, split, ids)
    module = AuditPredictModule(model, engines, multilabel, s)
    trainer = build_trainer(
        cfg,
        out,
        callbacks=False,
        loggers=False,
        inference_mode=not any(e.needs_gradients for e in engines.values()),
        max_epochs=None,
        # Small and fast: one device, every rank of a DDP run audits alone (rank 0 writes).
        devices=1,
        num_nodes=1,
        strategy="auto",
    )
    preds = cast("list[dict[str, Any]]", trainer.predict(module, dataloaders=loader))
    rows = [r for p in preds for r in p["rows"]]
    counts = torch.stack([p["counts"] for p in preds]).sum(0)
    classes = list(hp["class_names"])
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "camseg_version": __version__,
        "classifier": {"sha256": sha256_file(ckpt), "classes": classes, "multilabel": multilabel},
        "dataset": {"root": str(Path(dm.root).resolve()), "split": split, "images": len(ids)},
        "settings": {
            **s.__dict__,
            "mean": list(s.mean),
            "std": list(s.std),
            "tta": bool(OmegaConf.select(cfg, "audit.tta", default=True)),
            "cam": {n: e.describe() for n, e in engines.items()},
        },
        "methods": {},
        "focus": {},
    }
    for name in engines:
        mean_map = torch.stack([p["map_sum"][name] for p in preds]).sum(0) / max(1, len(rows))
        doc["methods"][name] = summarise_method(rows, name, classes, rule, mean_map)
        sums = torch.stack([p["focus"][name] for p in preds]).sum(0)
        doc["focus"][name] = {**focus_summary(sums, counts, classes), "image": f"focus_{name}.png"}
        save_png_atomic(out / f"focus_{name}.png", focus_image(sums, counts))
    primary = next(iter(engines))
    doc["headline"] = _headline(primary, doc["methods"][primary])
    doc["rows"] = rows
    return doc


def focus_image(sums: torch.Tensor, counts: torch.Tensor, scale: int = 3) -> np.ndarray:
    """(K,2,S,S) sums -> uint8 picture: one row per class, columns predicted / missed,
    each mean map scaled to [0,255] by its own maximum (an empty cell stays black)."""
    k, _, side, _ = sums.shape
    means = sums / counts.clamp_min(1)[..., None, None]
    peak = means.flatten(2).amax(dim=2).clamp_min(1e-12)[..., None, None]
    cells = (means / peak * 255).round().to(torch.uint8).numpy()
    gap = 2
    out = np.zeros((k * (side * scale + gap) - gap, 2 * (side * scale + gap) - gap), np.uint8)
    for i in range(k):
        for j in range(2):
            y, x = i * (side * scale + gap), j * (side * scale + gap)
            out[y : y + side * scale, x : x + side * scale] = np.kron(
                cells[i, j], np.ones((scale, scale), np.uint8)
            )
    return out


def _inputs(cfg: DictConfig, run: RunDir) -> dict[str, str | None]:
    return {
        fingerprint.LABELS: fingerprint.labels_digest(str(cfg.data.root)),
        fingerprint.CLS_CHECKPOINT: sha256_file(run.cls_best),
    }


def run_audit(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    """Write ``run/audit/audit.json`` (reused while its fingerprint matches, else redone)."""
    from lightning.pytorch.utilities import rank_zero_only

    run.require(run.cls_best, "cls")
    out = run.stage("audit")
    dm = build_datamodule(cfg)
    dm.setup("predict")
    check_compatible(run.cls_best, dm.classes, fix="re-run stage cls with force=true to rewrite it")
    fp = fingerprint.compute("audit", cfg, _inputs(cfg, run))
    path = out / AUDIT_JSON
    if path.is_file() and not cfg.get("force", False):
        recorded = fingerprint.read(out)
        if recorded is not None and fingerprint.mismatch_message(out, recorded, fp) is None:
            log.info("stage audit: %s matches its fingerprint; reused", path)
            return result(read_json(path))
        log.info("stage audit: %s was made with other settings or inputs; auditing again", path)
    out.mkdir(parents=True, exist_ok=True)
    doc = audit_dataset(cfg, run.cls_best, dm, out)
    doc["classifier"]["checkpoint"] = os.path.relpath(run.cls_best, run.root)
    if rank_zero_only.rank == 0:  # type: ignore[attr-defined]
        fingerprint.write(out, fp)
        write_json_atomic(path, doc)  # last: audit.json on disk means the stage is complete
    res = result(doc)
    log.info("stage audit: %s", headline_text(doc))
    return res


def headline_text(doc: dict[str, Any]) -> str:
    h = doc["headline"]

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0%}"

    flag = (
        "SHORTCUT: " + "; ".join(h["shortcut_reasons"]) if h["shortcut"] else "no shortcut flagged"
    )
    return (
        f"{h['method']}: energy inside the lesion {pct(h['energy_pointing'])}, pointing game "
        f"{pct(h['pointing_game'])}, energy outside the body {pct(h['out_of_body_share'])}; {flag}"
    )


def result(doc: dict[str, Any]) -> dict[str, Any]:
    """What the pipeline returns for the stage (and sweeps may optimise)."""
    h = doc["headline"]
    return {
        "stage": "audit",
        "audit/energy_pointing": h["energy_pointing"],
        "audit/pointing_game": h["pointing_game"],
        "audit/out_of_body_share": h["out_of_body_share"],
        "audit/shortcut": h["shortcut"],
    }
