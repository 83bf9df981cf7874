"""Stage 2 runner: load the stage-1 checkpoint, write pseudo-masks through ``Trainer.predict``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from camseg import __version__, fingerprint
from camseg.cam import CamMethod, PseudoMaskPolicy, build_cam_method
from camseg.cls.checkpoint import check_compatible, load_classifier
from camseg.constants import IGNORE_INDEX, MANIFEST_SCHEMA_VERSION
from camseg.errors import CamsegError, ConfigError
from camseg.pseudo.audit_check import check_audit
from camseg.pseudo.calibrate import Calibration, calibrate_if_asked
from camseg.pseudo.coverage import check_min_coverage, stop_if_uncovered_run
from camseg.pseudo.merge import finalize
from camseg.pseudo.refine import refine_mode, refine_pseudo
from camseg.pseudo.writer import CamPredictModule, PseudoLabelWriter, SampleInfo, lacking_files
from camseg.rundir import RunDir
from camseg.stage_common import build_datamodule
from camseg.training import build_trainer
from camseg.utils.io import read_json, remove_path, sha256_file, write_json_atomic

log = logging.getLogger(__name__)


def build_engine(cfg: DictConfig, model: Any, multilabel: bool) -> tuple[CamMethod, dict[str, Any]]:
    """The CAM engine (method + TTA) from ``cfg.cam``, and its description for the manifest."""
    c = cfg.cam
    members = list(c.get("methods") or [])
    if c.method == "ensemble" and not members:
        raise ConfigError("cam.method=ensemble needs cam.methods, e.g. cam.methods=[cam,layercam]")
    ensemble = {"methods": members, "fusion": c.get("fusion", "mean"), "weights": c.get("weights")}
    shared: dict[str, Any] = {
        "multilabel": multilabel,
        "batch_size": int(c.get("scorecam_batch_size", 32)),
    }
    if c.get("target_layer"):
        shared["target_layer"] = str(c.target_layer)
    engine = build_cam_method(
        str(c.method),
        model,
        scales=[float(s) for s in c.scales],
        flip=bool(c.flip),
        shared=shared,
        **(ensemble if c.method == "ensemble" else {}),
    )
    return engine, {**engine.describe(), "image_size": int(cfg.data.image_size)}


def build_policy(cfg: DictConfig, multilabel: bool) -> PseudoMaskPolicy:
    p = cfg.pseudo
    check_min_coverage(p.get("min_positive_coverage", 0.0))  # a bad value fails before the CAMs
    crf = OmegaConf.to_container(p.crf, resolve=True) if p.get("crf") else None
    return PseudoMaskPolicy(
        fg_threshold=float(p.fg_threshold),
        bg_threshold=float(p.bg_threshold),
        multilabel=multilabel,
        min_component_size=float(p.get("min_component_size", 0)),
        crf=crf,  # type: ignore[arg-type]
        threshold_rule=str(p.get("threshold_rule", "absolute")),
    )


def _provenance(
    cfg: DictConfig, run: RunDir, dm: Any, cam_desc: dict[str, Any], policy: PseudoMaskPolicy
) -> dict[str, Any]:
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "camseg_version": __version__,
        "run_name": run.name,
        # Relative to the run directory, so a moved run directory stays valid.
        "classifier": {
            "checkpoint": os.path.relpath(run.cls_best, run.root),
            "sha256": sha256_file(run.cls_best),
            "classes": dm.classes,
        },
        "cam": cam_desc,
        "policy": {**policy.describe(), "ignore_index": IGNORE_INDEX},
        "dataset": {
            "root": str(Path(dm.root).resolve()),
            "labels_sha256": sha256_file(Path(dm.root) / "labels.csv"),
            "classes": dm.classes,
            "split": dm.predict_split,
            "split_seed": dm.split_seed,
            **({"cv_folds": dm.cv_folds, "cv_fold": dm.cv_fold} if dm.cv_fold is not None else {}),
            "val_fraction": dm.val_fraction,
            "test_fraction": dm.test_fraction,
            "image_size": dm.image_size,
            "in_channels": dm.in_channels,
            "context_slices": dm.context_slices,
        },
    }


def _fingerprint(provenance: dict[str, Any]) -> dict[str, Any]:
    """What must match for a resumed run to continue: everything but where the dataset lives."""
    fp = json.loads(json.dumps(provenance))
    fp.get("dataset", {}).pop("root", None)
    return fp


def _inputs(provenance: dict[str, Any]) -> dict[str, str | None]:
    """The input digests of stage 2, as its provenance records them."""
    return {
        fingerprint.LABELS: provenance.get("dataset", {}).get("labels_sha256"),
        fingerprint.CLS_CHECKPOINT: provenance.get("classifier", {}).get("sha256"),
    }


def choose_overlays(ids_labels: list[tuple[str, tuple[int, ...]]], n: int) -> set[str]:
    """About 3/4 positives and 1/4 negatives, evenly spread over the sorted ids."""
    if n <= 0:
        return set()
    pos = sorted(i for i, lab in ids_labels if any(lab))
    neg = sorted(i for i, lab in ids_labels if not any(lab))
    n_pos = min(len(pos), max(n - min(len(neg), n // 4), 0))
    n_neg = min(len(neg), n - n_pos)

    def spread(xs: list[str], k: int) -> list[str]:
        if k <= 0:
            return []
        idx = np.linspace(0, len(xs) - 1, k).round().astype(int)
        return [xs[i] for i in sorted(set(idx.tolist()))]

    return set(spread(pos, n_pos)) | set(spread(neg, n_neg))


def _load_model(run: RunDir, dm: Any) -> tuple[Any, bool]:
    """The stage-1 classifier, checked against the data, and whether it is multilabel."""
    check_compatible(run.cls_best, dm.classes, fix="re-run stage cls with force=true to rewrite it")
    model, hp = load_classifier(run.cls_best)
    multilabel = bool(hp.get("multilabel", True))
    if int(hp["net_config"].get("in_channels", dm.in_channels)) != dm.in_channels:
        raise CamsegError(
            f"{run.cls_best}: classifier takes {hp['net_config']['in_channels']} channels but data.in_channels={dm.in_channels}"
        )
    return model, multilabel


def _start_output(
    run: RunDir,
    provenance: dict[str, Any],
    fp: fingerprint.Fingerprint,
    calibration: Calibration | None,
    force: bool,
) -> None:
    """Clear ``run/pseudo`` (force) or check that it may be resumed, then record the
    calibration, provenance.json and the fingerprint."""
    out = run.pseudo
    prov_path = out / "provenance.json"
    legacy = False
    # Under DDP every rank runs this; only rank 0 deletes, and with force no rank trusts what is
    # on disk, so all ranks agree on the samples to predict.
    if out.exists() and force and rank_zero_only.rank == 0:  # type: ignore[attr-defined]
        log.info("stage pseudo: force=true, removing %s", out)
        remove_path(out, run.root)
    if prov_path.is_file() and not force:
        old = read_json(prov_path)
        # Stage 2 resumes sample by sample: its fingerprint, recorded when it started, is
        # checked on every rerun, finished or not (before camseg recorded one: the inputs
        # its provenance names).
        legacy = not fingerprint.check(out, fp, legacy_inputs=_inputs(old))
        if _fingerprint(old) != _fingerprint(provenance):
            changed = sorted(
                k for k in provenance if _fingerprint(old).get(k) != _fingerprint(provenance)[k]
            )
            raise CamsegError(
                f"{out}: existing pseudo-labels were made with other settings ({', '.join(changed)} differ); "
                "run with force=true to rebuild them, or use another run_name"
            )
    out.mkdir(parents=True, exist_ok=True)
    if calibration is not None:
        calibration.write(out)
    write_json_atomic(prov_path, provenance)
    if not legacy:
        fingerprint.write(out, fp)


def _samples_todo(
    out: Path, all_samples: list[Any], save_cams: bool, overlay_ids: set[str], force: bool
) -> list[Any]:
    """The samples still to predict: those with no row, or whose files are gone since."""
    rows_dir = out / "rows"
    done = {p.stem for p in rows_dir.glob("*.json")} if rows_dir.is_dir() and not force else set()
    # A row marks a sample done; one whose files are gone since is predicted again.
    lacking = lacking_files(out, done, save_cams, overlay_ids)
    if lacking:
        log.warning(
            "stage pseudo: %d samples marked done lack their files (e.g. %s); predicting them again",
            len(lacking),
            min(lacking),
        )
    todo = [s for s in all_samples if s.id not in done or s.id in lacking]
    log.info(
        "stage pseudo: %d samples, %d already done, %d to go",
        len(all_samples),
        len(all_samples) - len(todo),
        len(todo),
    )
    return todo


def _sample_infos(dm: Any, samples: list[Any]) -> dict[str, SampleInfo]:
    """What the writer needs of each sample, by id: its image and mask files, its group."""
    assert dm.index is not None
    return {
        s.id: SampleInfo(
            s.id,
            s.image,
            dm.index.path(s.image),
            dm.index.path(s.mask) if s.mask else None,
            s.group,
        )
        for s in samples
    }


def _predict(
    cfg: DictConfig,
    out: Path,
    dm: Any,
    model: Any,
    engine: CamMethod,
    policy: PseudoMaskPolicy,
    all_samples: list[Any],
    todo: list[Any],
    overlay_ids: set[str],
    save_cams: bool,
) -> Any:
    """Write the masks, CAMs, overlays and rows of ``todo`` through ``Trainer.predict``;
    returns the trainer, past a barrier."""
    writer = PseudoLabelWriter(
        out,
        _sample_infos(dm, all_samples),
        policy,
        dm.num_classes,
        save_cams,
        overlay_ids,
        list(cfg.pseudo.sweep_thresholds),
        crf_workers=crf_workers(cfg.pseudo.get("crf_workers")),
    )
    todo_ids = {s.id for s in todo}
    dataset = dm.dataset(dm.predict_split, train=False)
    dataset.items = [it for it in dataset.items if it.id in todo_ids]
    loader = dm._loader(
        dataset,
        shuffle=False,
        batch_size=int(cfg.pseudo.get("batch_size") or dm.eval_batch_size),
    )
    module = CamPredictModule(
        model,
        engine,
        policy,
        channels_last=bool(cfg.model.get("channels_last", False)),
        max_image_pixels=dm.max_image_pixels,
    )
    trainer = build_trainer(
        cfg,
        out,
        callbacks=False,
        loggers=False,
        inference_mode=not engine.needs_gradients,
        max_epochs=None,
    )
    trainer.callbacks.append(writer)  # type: ignore[attr-defined]
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    trainer.strategy.barrier()
    return trainer


def run_pseudo(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    """Write ``run/pseudo``: masks, CAMs, overlays, manifest.json and quality.json."""
    run.require(run.cls_best, "cls")
    out = run.pseudo
    dm = build_datamodule(cfg)
    dm.setup("predict")
    model, multilabel = _load_model(run, dm)
    policy = build_policy(cfg, multilabel)
    refine_mode(cfg)  # pseudo.refine is checked before any CAM is computed
    # The audit's shortcut verdict on this classifier: warn (or stop) before any CAM.
    shortcut = check_audit(
        cfg,
        run,
        {
            fingerprint.LABELS: sha256_file(Path(dm.root) / "labels.csv"),
            fingerprint.CLS_CHECKPOINT: sha256_file(run.cls_best),
        },
    )
    engine, cam_desc = build_engine(cfg, model, multilabel)
    # -- pseudo.calibrate: the policy chosen on the validation patients (pseudo/calibrate.py) --
    calibration = calibrate_if_asked(cfg, run, dm, model, engine, policy)
    if calibration is not None:
        policy = calibration.policy
    provenance = _provenance(cfg, run, dm, cam_desc, policy)
    if calibration is not None:
        provenance["calibration"] = calibration.summary()
    # -- end of calibration --
    fp = fingerprint.compute("pseudo", cfg, _inputs(provenance))
    force = bool(cfg.get("force", False))
    _start_output(run, provenance, fp, calibration, force)

    all_samples = dm.samples(dm.predict_split)
    ids = [s.id for s in all_samples]
    overlay_ids = choose_overlays(
        [(s.id, s.labels) for s in all_samples], int(cfg.pseudo.get("overlays", 0))
    )
    save_cams = bool(cfg.pseudo.get("save_cams", True))
    todo = _samples_todo(out, all_samples, save_cams, overlay_ids, force)
    if todo:
        trainer = _predict(
            cfg, out, dm, model, engine, policy, all_samples, todo, overlay_ids, save_cams
        )
        # Affinity refinement (camseg.refine) rewrites masks and rows before they are merged.
        provenance = refine_pseudo(cfg, run, dm, policy, provenance)
        result = {}
        if trainer.is_global_zero:
            result = finalize(cfg, run, provenance, ids, dm.classes, shortcut)
        # The other ranks go on to stage 3 only once rank 0 has written the manifest.
        trainer.strategy.barrier()
        stop_if_uncovered_run(cfg, run, provenance)
        return result
    # Nothing left to predict: merging is idempotent and atomic, every rank may do it.
    provenance = refine_pseudo(cfg, run, dm, policy, provenance)
    result = finalize(cfg, run, provenance, ids, dm.classes, shortcut)
    stop_if_uncovered_run(cfg, run, provenance)
    return result


def crf_workers(value: Any) -> int | None:
    """``pseudo.crf_workers``: None (this rank's share of the cores) or an int >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"pseudo.crf_workers={value!r}: must be null (all cores) or an int >= 0 (0/1: in-process)"
        )
    return value
