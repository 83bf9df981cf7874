"""Stage-2 affinity refinement: train the affinity net, random-walk the CAMs, rewrite masks.

Runs after stage 2 wrote ``pseudo/cams/<id>.npz`` and ``pseudo/masks/<id>.png`` and
before the manifest is merged. Files (all written atomically)::

    pseudo/affinity/checkpoints/last.ckpt   the affinity net (resumable, weights_only)
    pseudo/affinity/metrics.json            written when training finished
    pseudo/masks/<id>.png, rows/<id>.json   rewritten; a row with ``refine`` is done

Training happens before any mask is rewritten, so it always sees the CAM (or CRF)
masks; a rerun resumes the training from ``last.ckpt``, or skips it when
``metrics.json`` exists, and refines only the samples whose row is not marked.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from camseg.cam import PseudoMaskPolicy
from camseg.checkpoints import (
    AFFINITY,
    check_resumable,
    load_weights,
    read_checkpoint,
    state_dict,
)
from camseg.constants import IGNORE_INDEX
from camseg.errors import ConfigError
from camseg.overlap import confusion_counts
from camseg.pseudo.refine_seeds import SeedConfig, write_seeds
from camseg.pseudo.writer import sweep_counts
from camseg.refine.module import TRAIN_LOSS, AffinityModule
from camseg.refine.net import AffinityNet, affinity_kwargs
from camseg.refine.pairs import Offset, local_offsets
from camseg.refine.walk import affinities, labels_from_walk, walk_with_background
from camseg.rundir import RunDir
from camseg.training import build_trainer
from camseg.utils.io import (
    read_image,
    read_json,
    read_mask,
    save_png_atomic,
    sha256_file,
    write_json_atomic,
)
from camseg.utils.large import resize_area, resize_nearest
from camseg.utils.overlay import pseudo_overlay

log = logging.getLogger(__name__)

MODES = ("none", "crf", "affinity", "affinity+crf")


def refine_mode(cfg: DictConfig) -> str:
    """``pseudo.refine``, checked against ``pseudo.crf`` and ``pseudo.save_cams``.

    Absent (configs before this key): ``crf`` when a CRF is set, else ``none``.
    """
    p = cfg.pseudo
    has_crf = bool(p.get("crf"))
    mode = p.get("refine")
    if mode is None:
        return "crf" if has_crf else "none"
    mode = str(mode)
    if mode not in MODES:
        raise ConfigError(f"pseudo.refine={mode}: use one of {list(MODES)}")
    wants_crf = mode in ("crf", "affinity+crf")
    if wants_crf and not has_crf:
        raise ConfigError(
            f"pseudo.refine={mode} needs pseudo.crf; use pseudo=crf or pseudo=affinity_crf"
        )
    if has_crf and not wants_crf:
        raise ConfigError(
            f"pseudo.refine={mode} but pseudo.crf is set; use pseudo.refine=affinity+crf, "
            "or pseudo.crf=null"
        )
    if mode.startswith("affinity"):
        if not p.get("save_cams", True):
            raise ConfigError(f"pseudo.refine={mode} reads pseudo/cams: set pseudo.save_cams=true")
        if not p.get("affinity"):
            raise ConfigError(
                f"pseudo.refine={mode} needs a pseudo.affinity block; use pseudo=affinity"
            )
    return mode


class _SaveLast(L.Callback):
    """``last.ckpt`` after every epoch, written to a temporary name and renamed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tmp = self.path.with_name(f"{self.path.name}.partial-{os.getpid()}")
        # The full state (weights, optimizer, loops; the second argument says "not the weights
        # alone"): resumable. It is read back only through camseg.checkpoints, which never unpickles.
        trainer.save_checkpoint(tmp, False)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)


def _net_config(cfg: DictConfig, in_channels: int) -> dict[str, Any]:
    a = cfg.pseudo.affinity
    keys = ("backbone", "pretrained", "feature_dim", "stride")
    raw = {k: a.get(k) for k in keys if a.get(k) is not None}
    return affinity_kwargs({**raw, "in_channels": in_channels}, "pseudo.affinity")


def train_affinity(cfg: DictConfig, run: RunDir, dm: Any, train_ids: list[str]) -> L.Trainer | None:
    """Fit (or resume) the affinity net on the training pseudo-masks; None when done before."""
    out = run.pseudo / "affinity"
    last = out / "checkpoints" / "last.ckpt"
    done = out / "metrics.json"
    if done.is_file() and last.is_file():
        return None
    a = cfg.pseudo.affinity
    if not train_ids:
        raise ConfigError(
            "pseudo.refine=affinity: no training-split samples to learn affinities from"
        )
    L.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    net_config = _net_config(cfg, dm.in_channels)
    module = AffinityModule(
        AffinityNet(**net_config),
        net_config,
        dm.classes,
        radius=int(a.radius),
        lr=float(a.lr),
        weight_decay=float(a.weight_decay),
    )
    wanted = set(train_ids)
    items = [it for it in dm.dataset(dm.predict_split, train=False).items if it.id in wanted]
    seeds = SeedConfig.from_cfg(a.get("seeds"))
    workers = cfg.pseudo.get("crf_workers")
    masks = write_seeds(run, seeds, items, None if workers is None else int(workers))
    log.info(
        "stage pseudo: the affinity net learns from %d %s seed masks", len(masks), seeds.source
    )
    ds = dm.dataset("train", train=True, masks=masks)
    loader = dm._loader(ds, True, int(a.batch_size), "train")
    resume = last.is_file()
    if resume:
        check_resumable(read_checkpoint(last, AFFINITY), str(last))
        log.info("stage pseudo: resuming the affinity net from %s", last)
    last.parent.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(cfg, out, max_epochs=int(a.max_epochs), callbacks=False, loggers=False)
    trainer.callbacks.append(_SaveLast(last))  # type: ignore[attr-defined]
    trainer.fit(module, train_dataloaders=loader, ckpt_path=str(last) if resume else None)
    if trainer.is_global_zero:
        loss = trainer.callback_metrics.get(TRAIN_LOSS)
        write_json_atomic(
            done,
            {
                "epochs": int(a.max_epochs),
                "samples": len(train_ids),
                TRAIN_LOSS: None if loss is None else float(loss),
            },
        )
    trainer.strategy.barrier()
    return trainer


def load_affinity_net(path: Path) -> tuple[AffinityNet, dict[str, Any]]:
    """The affinity net of a checkpoint (read through :mod:`camseg.checkpoints`) and its hparams."""
    label = str(path)
    ckpt = read_checkpoint(path, AFFINITY)
    hp = ckpt["hyper_parameters"]
    kwargs = {**affinity_kwargs(hp["net_config"], label), "pretrained": False}
    net = AffinityNet(**kwargs)
    load_weights(net, state_dict(ckpt, label), label)
    return net.eval(), hp


def describe(cfg: DictConfig, run: RunDir, mode: str) -> dict[str, Any]:
    """What the manifest records about the refinement."""
    if not mode.startswith("affinity"):
        return {"method": mode}
    last = run.pseudo / "affinity" / "checkpoints" / "last.ckpt"
    a = cfg.pseudo.affinity
    return {
        "method": mode,
        "checkpoint": os.path.relpath(last, run.root),
        "sha256": sha256_file(last),
        "net": _net_config(cfg, int(cfg.data.get("in_channels", 3))),
        **{k: a[k] for k in ("radius", "beta", "iterations", "max_epochs", "lr", "weight_decay")},
        **{k: float(a.get(k, d)) for k, d in (("bg_power", 1.0), ("min_share", 0.5))},
        "seeds": SeedConfig.from_cfg(a.get("seeds")).describe(),
    }


def refine_pseudo(
    cfg: DictConfig, run: RunDir, dm: Any, policy: PseudoMaskPolicy, provenance: dict[str, Any]
) -> dict[str, Any]:
    """Refine stage 2's masks when ``pseudo.refine`` asks for affinity; the provenance to
    merge into the manifest (with a ``refine`` entry)."""
    mode = refine_mode(cfg)
    if not mode.startswith("affinity"):
        return provenance
    ids = sorted(p.stem for p in (run.pseudo / "rows").glob("*.json"))
    train = {s.id for s in dm.samples("train")}
    trainer = train_affinity(cfg, run, dm, [i for i in ids if i in train])
    rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
    device = trainer.strategy.root_device if trainer else torch.device("cpu")
    todo = [i for i in ids if read_json(run.pseudo / "rows" / f"{i}.json").get("refine") != mode]
    mine = todo[rank::world]
    log.info(
        "stage pseudo: affinity refinement of %d samples (%d done before)",
        len(todo),
        len(ids) - len(todo),
    )
    if mine:
        net, hp = load_affinity_net(run.pseudo / "affinity" / "checkpoints" / "last.ckpt")
        refine_samples(cfg, run, dm, policy, net.to(device), hp, mine, mode)
    if trainer is not None:
        trainer.strategy.barrier()
    return {**provenance, "refine": describe(cfg, run, mode)}


def refine_samples(
    cfg: DictConfig,
    run: RunDir,
    dm: Any,
    policy: PseudoMaskPolicy,
    net: AffinityNet,
    hp: dict[str, Any],
    ids: list[str],
    mode: str,
) -> None:
    """Random-walk each sample's CAMs over its predicted affinities; rewrite mask and row."""
    a = cfg.pseudo.affinity
    offsets = local_offsets(int(hp["radius"]))
    wanted = set(ids)
    ds = dm.dataset(dm.predict_split, train=False)
    ds.items = [it for it in ds.items if it.id in wanted]
    paths = {it.id: (it.image, it.mask) for it in ds.items}
    loader = dm._loader(ds, False, int(cfg.pseudo.get("batch_size") or dm.eval_batch_size))
    device = next(net.parameters()).device
    thresholds = list(cfg.pseudo.sweep_thresholds)
    beta, iterations = float(a.beta), int(a.iterations)
    bg_power, min_share = float(a.get("bg_power", 1.0)), float(a.get("min_share", 0.5))
    for batch in loader:
        with torch.inference_mode():
            aff = affinities(net(batch["image"].to(device)), offsets)
            present = batch["labels"].to(device) > 0
            shares = _walk_batch(
                run, batch["id"], present, aff, offsets, beta, iterations, bg_power
            )
        for i, sid in enumerate(batch["id"]):
            _write_refined(
                run,
                policy,
                sid,
                shares[sid],
                batch["labels"][i],
                paths[sid],
                mode,
                thresholds,
                min_share,
            )


WALK_CHUNK = 16  # samples walked together: amortises the per-step overhead, bounds memory


def _walk_batch(
    run: RunDir,
    ids: list[str],
    present: torch.Tensor,
    aff: torch.Tensor,
    offsets: list[Offset],
    beta: float,
    iterations: int,
    bg_power: float,
) -> dict[str, torch.Tensor]:
    """Each sample's walked shares (1,1+K,H,W) on the CPU, walked in chunks of samples whose
    CAMs have one size (a folder may mix image sizes)."""
    cams = {}
    for sid in ids:
        with np.load(run.pseudo / "cams" / f"{sid}.npz") as z:
            cams[sid] = torch.from_numpy(z["cams"].astype(np.float32))
    out: dict[str, torch.Tensor] = {}
    for shape in dict.fromkeys(tuple(c.shape) for c in cams.values()):
        same = [i for i, sid in enumerate(ids) if tuple(cams[sid].shape) == shape]
        for start in range(0, len(same), WALK_CHUNK):
            idx = same[start : start + WALK_CHUNK]
            stack = torch.stack([cams[ids[i]] for i in idx]).to(aff.device)
            walked = walk_with_background(
                stack, present[idx], aff[idx], offsets, beta, iterations, bg_power
            ).cpu()
            for j, i in enumerate(idx):
                out[ids[i]] = walked[j : j + 1]
    return out


def _refined_mask(
    policy: PseudoMaskPolicy,
    image: np.ndarray,
    shares: torch.Tensor,
    labels: torch.Tensor,
    min_share: float,
) -> tuple[torch.Tensor, np.ndarray]:
    """The class probabilities at walk size and the refined mask at image size."""
    walked = shares[:, 1:]
    h, w = walked.shape[2:]
    lab = labels.to(torch.uint8)[None]
    img_t = None
    if policy.crf is not None:
        small = resize_area(image, h, w)
        img_t = torch.from_numpy(small if small.ndim == 3 else small[..., None]).permute(2, 0, 1)[
            None
        ]
    if policy.crf is None:
        probs = walked
        mask = labels_from_walk(shares, min_share)[0].numpy()
    else:
        probs = policy.probabilities(walked, lab, img_t)
        mask = policy.threshold(probs, lab)[0].numpy().astype(np.uint8)
    return probs, resize_nearest(mask, *image.shape[:2])


def _quality(
    quality: dict[str, Any],
    mask: np.ndarray,
    gt: np.ndarray,
    probs: torch.Tensor,
    labels: torch.Tensor,
    thresholds: list[float],
    policy: PseudoMaskPolicy,
) -> dict[str, Any]:
    """The row's ``quality`` entry with the refined mask's counts and threshold sweep.

    ``probs`` is (1,K,h,w); ``mask`` and ``gt`` are at image size.
    """
    p = probs[0].float().numpy()
    quality["counts"] = confusion_counts(
        torch.from_numpy(mask)[None], torch.from_numpy(gt)[None], p.shape[0]
    )[0].tolist()
    quality["sweep"] = sweep_counts(
        p,
        labels.numpy().astype(np.uint8),
        resize_nearest(gt, *p.shape[1:]),
        thresholds,
        policy.threshold_rule,
    )
    return quality


def _write_refined(
    run: RunDir,
    policy: PseudoMaskPolicy,
    sid: str,
    shares: torch.Tensor,
    labels: torch.Tensor,
    paths: tuple[Path, Path | None],
    mode: str,
    thresholds: list[float],
    min_share: float,
) -> None:
    """``shares`` (1,1+K,H,W): the walked background and class shares. ``affinity``: their
    argmax, ignore below ``min_share``; ``affinity+crf``: the policy (with its CRF) on the
    class shares."""
    out = run.pseudo
    image = read_image(paths[0])
    k, h, w = shares[:, 1:].shape[1:]
    probs, mask = _refined_mask(policy, image, shares, labels, min_share)
    save_png_atomic(out / "masks" / f"{sid}.png", mask)
    row_path = out / "rows" / f"{sid}.json"
    row = read_json(row_path)
    counts = np.bincount(mask.ravel(), minlength=256)
    row["fg_fraction"] = float(counts[1:IGNORE_INDEX].sum() / mask.size)
    row["ignore_fraction"] = float(counts[IGNORE_INDEX] / mask.size)
    row["class_fraction"] = [float(v) for v in counts[1 : k + 1] / mask.size]
    gt = read_mask(paths[1]) if paths[1] is not None and "quality" in row else None
    if gt is not None:
        row["quality"] = _quality(row["quality"], mask, gt, probs, labels, thresholds, policy)
    overlay = out / "overlays" / f"{sid}.png"
    if overlay.is_file():
        present = labels.numpy()[:, None, None] > 0
        cam_map = (probs[0].float().numpy() * present).max(axis=0)
        save_png_atomic(
            overlay,
            pseudo_overlay(
                resize_area(image, h, w),
                cam_map,
                resize_nearest(mask, h, w),
                None if gt is None else resize_nearest(gt, h, w),
            ),
        )
    row["refine"] = mode
    write_json_atomic(row_path, row)  # last: the row marks the sample refined
