"""``pseudo.calibrate``: choose the pseudo-mask policy on the validation patients' masks.

Stage 2 computes the CAMs of the validation images that have a ground-truth mask,
exactly as it does for the training images (same engine, same size, same CRF input),
searches the policy grid of :mod:`camseg.pseudo.calibrate_search` for the best
validation Dice, and pseudo-labels the training patients with the chosen policy. The
test patients are never read. ``pseudo/calibration.json`` keeps the whole search; the
manifest's ``calibration`` entry says what was searched, what was chosen and its Dice.

``pseudo.calibrate``: ``false`` (the configured policy), ``true`` (calibrate; refuse when
no validation image has a mask), ``auto`` (calibrate when validation masks exist, else
the configured policy with a warning in the log, the manifest and the report).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from camseg import fingerprint
from camseg.cam import PseudoMaskPolicy
from camseg.errors import CamsegError
from camseg.optional import MissingPackageError
from camseg.overlap import confusion_counts
from camseg.pseudo.calibrate_search import ValidationSet, search
from camseg.rundir import RunDir
from camseg.units import Grid, calibrate_mode
from camseg.utils.io import (
    pyplot,
    read_image,
    read_json,
    read_mask,
    save_figure_atomic,
    sha256_file,
    write_json_atomic,
)
from camseg.utils.large import resize_area, resize_nearest

log = logging.getLogger(__name__)

FILENAME = "calibration.json"
PLOT = "calibration.png"


@dataclass
class Calibration:
    """The policy stage 2 applies, and the record of how it was chosen."""

    policy: PseudoMaskPolicy
    record: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """The manifest's ``calibration`` entry: the record without the full table."""
        return {k: v for k, v in self.record.items() if k not in ("table", "fingerprint")}

    def write(self, out_dir: Any) -> None:
        write_json_atomic(out_dir / FILENAME, self.record)
        if self.record.get("table"):
            try:
                plot_search(self.record, out_dir / PLOT)
            except ImportError:  # matplotlib is optional for the plot alone
                log.info("calibration: matplotlib missing, no %s", PLOT)


def _device(cfg: DictConfig) -> torch.device:
    wanted = str(cfg.trainer.get("accelerator", "auto"))
    if wanted in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def collect_validation(cfg: DictConfig, dm: Any, model: Any, engine: Any) -> ValidationSet | None:
    """CAMs, CRF images and ground truth of the validation images with a mask; None if none
    of them is positive."""
    from camseg.pseudo.writer import CamPredictModule

    with_mask = [s for s in dm.samples("val") if s.mask]
    positives = [s for s in with_mask if any(s.labels)]
    if not positives:
        return None
    k = dm.num_classes
    negative_counts = torch.zeros(k, 3, dtype=torch.int64)
    for s in with_mask:
        if not any(s.labels):
            gt = torch.from_numpy(read_mask(dm.index.path(s.mask)))[None]
            negative_counts += confusion_counts(torch.zeros_like(gt), gt, k).sum(0)
    by_id = {s.id: s for s in positives}
    dataset = dm.dataset("val", train=False)
    dataset.items = [it for it in dataset.items if it.id in by_id]
    loader = dm._loader(dataset, shuffle=False, batch_size=int(dm.eval_batch_size), split="val")
    device = _device(cfg)
    module = CamPredictModule(
        model, engine, PseudoMaskPolicy(), max_image_pixels=dm.max_image_pixels
    )
    module.to(device)
    module.on_predict_start()
    by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, ...]]] = {}
    for i, batch in enumerate(loader):
        batch = {**batch, "image": batch["image"].to(device), "labels": batch["labels"].to(device)}
        out = module.predict_step(batch, i)
        for sid, cams, labels in zip(out["ids"], out["cams"], out["labels"], strict=True):
            s = by_id[sid]
            h, w = cams.shape[-2:]
            image = resize_area(read_image(dm.index.path(s.image)), h, w)
            image_t = torch.from_numpy(image if image.ndim == 3 else image[..., None]).permute(
                2, 0, 1
            )
            truth = resize_nearest(read_mask(dm.index.path(s.mask)), h, w)
            key = (h, w, image_t.shape[0])
            by_shape.setdefault(key, []).append(
                (cams.float(), labels.float(), image_t, torch.from_numpy(truth))
            )
    groups = [
        tuple(torch.stack([item[j] for item in items]) for j in range(4))
        for items in by_shape.values()
    ]
    return ValidationSet(
        groups=groups,  # type: ignore[arg-type]
        negative_counts=negative_counts,
        num_classes=k,
        samples=len(with_mask),
        positives=len(positives),
        patients=len({s.group for s in with_mask}),
    )


def _fingerprint(cfg: DictConfig, run: RunDir, dm: Any) -> dict[str, Any]:
    fp = fingerprint.compute(
        "pseudo",
        cfg,
        {
            fingerprint.LABELS: sha256_file(dm.root / "labels.csv"),
            fingerprint.CLS_CHECKPOINT: sha256_file(run.cls_best),
        },
    )
    return json.loads(json.dumps({"inputs": fp.inputs, "config": fp.config}))


def _reuse_cached(
    run: RunDir, fp: dict[str, Any], configured: PseudoMaskPolicy
) -> Calibration | None:
    """The calibration recorded in the run for the same fingerprint, if any."""
    cached = run.pseudo / FILENAME
    if cached.is_file():
        record = read_json(cached)
        if record.get("fingerprint") == fp and record.get("status") == "calibrated":
            log.info("stage pseudo: reusing the calibration in %s", cached)
            return Calibration(policy_from(record["chosen"], configured.multilabel), record)
    return None


def _not_calibrated(
    mode: str, dm: Any, grid: Grid, fp: dict[str, Any], configured: PseudoMaskPolicy
) -> Calibration:
    """No validation masks: refuse under ``calibrate=true``, else the configured policy."""
    reason = (
        f"no validation image of a positive class has a ground-truth mask "
        f"({len(dm.samples('val'))} validation images)"
    )
    if mode == "true":
        raise CamsegError(
            f"pseudo.calibrate=true: {reason}; add masks for a few validation patients, "
            "or set pseudo.calibrate=auto (configured policy when there are none) or false"
        )
    log.warning("stage pseudo: NOT calibrated: %s; using the configured policy", reason)
    record = {"status": "skipped", "reason": reason, "grid": grid.describe()}
    return Calibration(configured, {**record, "fingerprint": fp})


def _crf_available() -> bool:
    """Whether pydensecrf2 imports (the search then includes the CRF); warns when not."""
    try:
        from camseg.cam.crf import import_densecrf

        import_densecrf()
    except MissingPackageError:
        log.warning("stage pseudo: pydensecrf2 missing, calibration searches without the CRF")
        return False
    return True


def calibrate_if_asked(
    cfg: DictConfig, run: RunDir, dm: Any, model: Any, engine: Any, configured: PseudoMaskPolicy
) -> Calibration | None:
    """The calibrated policy (or the configured one, with the reason), or None when off.

    A calibration recorded in ``pseudo/calibration.json`` for the same fingerprint is reused
    (a resumed stage 2 applies the policy it started with); ``force=true`` redoes it.
    """
    p = cfg.pseudo
    mode = calibrate_mode(p.get("calibrate", False))
    if mode == "false":
        return None
    node = p.get("calibration")
    grid_node = OmegaConf.to_container(node, resolve=True) if node is not None else None
    grid = Grid.from_config(grid_node)  # type: ignore[arg-type]
    fp = _fingerprint(cfg, run, dm)
    if not cfg.get("force", False):
        reused = _reuse_cached(run, fp, configured)
        if reused is not None:
            return reused
    val = collect_validation(cfg, dm, model, engine)
    if val is None:
        return _not_calibrated(mode, dm, grid, fp, configured)
    with_crf = _crf_available()
    log.info(
        "stage pseudo: calibrating on %d validation images (%d positive, %d patients), %d candidates",
        val.samples,
        val.positives,
        val.patients,
        grid.size(with_crf),
    )
    found = search(val, grid, configured, with_crf)
    chosen: PseudoMaskPolicy = found["policy"]
    record = {
        "status": "calibrated",
        "grid": grid.describe(),
        "candidates": len(found["table"]),
        "validation": {"images": val.samples, "positives": val.positives, "patients": val.patients},
        "configured": configured.describe(),
        "configured_val_dice": found["configured_val_dice"],
        "chosen": chosen.describe(),
        "val_dice": found["val_dice"],
        "bg_search": found["bg_search"],
        "table": found["table"],
        "fingerprint": fp,
    }
    log.info(
        "stage pseudo: calibrated policy %s: validation Dice %.3f (configured policy %.3f)",
        _short(chosen.describe()),
        found["val_dice"],
        found["configured_val_dice"],
    )
    return Calibration(chosen, record)


def policy_from(described: dict[str, Any], multilabel: bool) -> PseudoMaskPolicy:
    """The policy a :meth:`PseudoMaskPolicy.describe` dict names."""
    return PseudoMaskPolicy(
        fg_threshold=described["fg_threshold"],
        bg_threshold=described["bg_threshold"],
        multilabel=multilabel,
        min_component_size=described["min_component_size"],
        crf=described.get("crf"),
        threshold_rule=described.get("threshold_rule", "absolute"),
    )


def _short(d: dict[str, Any]) -> str:
    crf = d.get("crf")
    return (
        f"{d['threshold_rule']} fg {d['fg_threshold']:g} bg {d['bg_threshold']:g}, "
        f"min_component_size {d['min_component_size']:g}, "
        + ("no CRF" if not crf else f"CRF bg_power {crf['bg_power']:g}")
    )


def plot_search(record: dict[str, Any], path: Any) -> None:
    """Validation Dice against the foreground threshold, one line per CRF setting and rule
    (the best clean-up size at each point)."""
    plt = pyplot()
    best: dict[tuple[Any, str], dict[float, float]] = {}
    for r in record["table"]:
        line = best.setdefault((r["crf_bg_power"], r["rule"]), {})
        line[r["fg_threshold"]] = max(line.get(r["fg_threshold"], 0.0), r["dice"])
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    powers = sorted({p for p, _ in best}, key=str)
    styles = ["-", "--", ":", "-."]
    markers = {"absolute": "o", "max_fraction": "s", "mass_quantile": "^"}
    for (power, rule), points in sorted(best.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        xs = sorted(points)
        label = f"{rule}, " + ("no CRF" if power is None else f"CRF bg_power {power:g}")
        ax.plot(
            xs,
            [points[x] for x in xs],
            ls=styles[powers.index(power) % len(styles)],
            marker=markers.get(rule, "o"),
            ms=3,
            label=label,
        )
    chosen = record["chosen"]
    ax.axvline(chosen["fg_threshold"], color="grey", ls=":", lw=1)
    ax.set_xlabel("fg_threshold (under the rule)")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(f"Policy calibration: chosen Dice {record['val_dice']:.3f}")
    fig.tight_layout()
    save_figure_atomic(path, fig)


def top_rows(record: dict[str, Any], n: int = 8) -> list[dict[str, Any]]:
    """The table's best ``n`` rows, best first (ties: grid order)."""
    table = list(enumerate(record.get("table") or []))
    table.sort(key=lambda ir: (-ir[1]["dice"], ir[0]))
    return [r for _, r in table[:n]]
