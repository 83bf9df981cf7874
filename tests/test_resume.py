"""A stage-1 run killed after epoch k and resumed with ``ckpt_path=last`` is the uninterrupted run.

Each run is a ``camseg`` process; the interrupted one ends itself with ``os._exit(137)``
(as ``kill -9``: nothing flushed, nothing closed) at the first batch of epoch ``KILL``,
after ``last.ckpt`` of the epoch before was written. The resumed process must then train
the remaining epochs exactly as the uninterrupted one did: same ``metrics.json``, same
per-epoch training losses, same final weights.

The interrupted and resumed runs use two DataLoader workers and the uninterrupted one
none: augmentations and order depend on (seed, epoch, sample) only, not on the workers.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
EPOCHS = 4
KILL = 2


def write_dataset(root: Path, patients: int = 6, slices: int = 4) -> Path:
    """Two learnable labels (a centre square, bright borders) in every patient."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for p in range(patients):
        for s in range(slices):
            img = rng.integers(30, 70, size=(SIZE, SIZE)).astype(np.uint8)
            a, b = (p + s) % 2, (p + s // 2) % 2
            if a:
                img[SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4] = 220
            if b:
                img[:, :3] = 250
                img[:, -3:] = 250
            Image.fromarray(img).save(root / "images" / f"P{p}_{s}.png")
            rows.append([f"images/P{p}_{s}.png", f"P{p}", s, a, b])
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "group", "slice", "square", "edges"])
        w.writerows(rows)
    return root


def camseg(root: Path, data: Path, *overrides: str) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "src"), str(REPO / "tests"), env.get("PYTHONPATH", "")]
    )
    env["OMP_NUM_THREADS"] = "1"  # the same arithmetic in every process
    args = [
        "debug=fast",
        f"paths.root_dir={root}",
        f"data.root={data}",
        "data.synthetic=null",
        f"data.image_size={SIZE}",
        "data.batch_size=8",
        "stages=[cls]",
        "run_name=r",
        # Early stopping and the best checkpoint in play; the monitor plateaus at 1.0, so
        # epochs whose score does not improve come before the interruption.
        "callbacks=default",
        "~callbacks.progress_bar",
        "logger=csv",
        "seed=7",
        f"model.max_epochs={EPOCHS}",
        "model.net.dropout=0.3",  # draws from torch's generator during training
        *overrides,
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "camseg.app", *args],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode not in (0, 137):
        raise AssertionError(proc.stderr[-3000:])
    return proc.returncode


def outcome(root: Path) -> tuple[dict[str, Any], list[tuple[int, float]], dict[str, torch.Tensor]]:
    out = root / "runs" / "r" / "cls"
    m = json.loads((out / "metrics.json").read_text())
    m.pop("best_checkpoint")  # an absolute path
    with open(out / "logs" / "csv" / "metrics.csv", newline="") as f:
        losses = sorted(
            (int(r["epoch"]), float(r["train/loss_epoch"]))
            for r in csv.DictReader(f)
            if r.get("train/loss_epoch")
        )
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return m, losses, last["state_dict"]


def test_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data")
    (tmp_path / "full").mkdir()
    (tmp_path / "cut").mkdir()
    assert camseg(tmp_path / "full", data, "data.num_workers=0") == 0
    workers = "data.num_workers=2"
    kill = (
        "+callbacks.kill._target_=kill_callback.KillAtEpochStart",
        f"+callbacks.kill.epoch={KILL}",
    )
    assert camseg(tmp_path / "cut", data, workers, *kill) == 137
    ckpt = tmp_path / "cut" / "runs" / "r" / "cls" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    # last.ckpt is the end of the epoch before the kill, not of the last improvement.
    assert saved["epoch"] == KILL - 1
    assert not (tmp_path / "cut" / "runs" / "r" / "cls" / "metrics.json").exists()
    assert camseg(tmp_path / "cut", data, workers, "ckpt_path=last") == 0

    full_m, full_losses, full_w = outcome(tmp_path / "full")
    cut_m, cut_losses, cut_w = outcome(tmp_path / "cut")
    assert cut_m == full_m
    assert len(full_losses) == EPOCHS and cut_losses == full_losses
    assert full_w.keys() == cut_w.keys()
    for k in full_w:
        assert torch.equal(full_w[k], cut_w[k]), k
