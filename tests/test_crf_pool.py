"""The dense CRF in a process pool gives the in-process CRF's results, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from camseg import fingerprint
from camseg.cam import CRFConfig, PseudoMaskPolicy
from camseg.cam.crf import CRFPool, crf_refine
from camseg.errors import ConfigError
from camseg.pseudo.stage import crf_workers
from camseg.pseudo.writer import PseudoLabelWriter, SampleInfo
from camseg.utils.io import save_png_atomic

pytest.importorskip("pydensecrf.densecrf")
REPO = Path(__file__).resolve().parents[1]
H, W = 40, 48  # not square: the kernel widths scale with sqrt(H*W)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cams = torch.rand(4, 2, H, W, generator=g) ** 2
    present = torch.tensor([[True, False], [True, True], [False, False], [False, True]])
    images = torch.randint(0, 256, (4, 3, H, W), generator=g, dtype=torch.uint8)
    return cams, present, images


@pytest.mark.parametrize("as_uint8", [True, False])
def test_pool_of_one_and_two_processes_equals_the_in_process_crf(as_uint8: bool) -> None:
    cams, present, images = _batch()
    if not as_uint8:
        images = images.float() / 255
    config = CRFConfig(iterations=3)
    here = crf_refine(cams, present, images, config)
    assert here[0, 0].abs().sum() > 0 and (here[2] == 0).all() and (here[0, 1] == 0).all()
    for workers in (1, 2):
        with CRFPool(workers) as pool:
            pooled = crf_refine(cams, present, images, config, pool)
            again = crf_refine(cams, present, images, config, pool)  # the pool is reused
        assert torch.equal(pooled, here), workers
        assert torch.equal(again, here), workers


def test_bad_worker_counts_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"pseudo.crf_workers=-1: must be >= 0"):
        CRFPool(-1)
    for bad in (-2, 1.5, "4", True):
        with pytest.raises(ConfigError, match=r"pseudo\.crf_workers="):
            crf_workers(bad)
    assert crf_workers(None) is None and crf_workers(0) == 0 and crf_workers(3) == 3


def test_crf_workers_does_not_change_the_pseudo_fingerprint(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        base = compose("config", overrides=["pseudo=crf", f"paths.root_dir={tmp_path}"])
        more = compose(
            "config", overrides=["pseudo=crf", f"paths.root_dir={tmp_path}", "pseudo.crf_workers=7"]
        )
    assert more.pseudo.crf_workers == 7 and base.pseudo.crf_workers is None
    assert fingerprint.stage_config("pseudo", base) == fingerprint.stage_config("pseudo", more)


def _write_all(tmp_path: Path, name: str, workers: int) -> Path:
    """Runs the stage-2 writer's CRF path over 4 samples, as Trainer.predict would."""
    cams, present, images = _batch(1)
    samples = {}
    for i in range(len(cams)):
        path = tmp_path / "images" / f"s{i}.png"
        if not path.is_file():
            save_png_atomic(path, images[i].permute(1, 2, 0).numpy())
        samples[f"s{i}"] = SampleInfo(f"s{i}", f"images/s{i}.png", path, None, f"p{i}")
    policy = PseudoMaskPolicy(fg_threshold=0.5, bg_threshold=0.2, crf=CRFConfig(iterations=3))
    out = tmp_path / name
    writer = PseudoLabelWriter(
        out, samples, policy, 2, True, {"s1"}, [0.3, 0.5], crf_workers=workers
    )
    trainer = SimpleNamespace(num_devices=1)
    writer.on_predict_start(trainer, None)  # type: ignore[arg-type]
    prediction = {
        "ids": list(samples),
        "labels": present.to(torch.uint8),
        "cams": list(cams.half()),
        "masks": [None] * len(cams),
    }
    writer.write_on_batch_end(trainer, None, prediction, None, None, 0, 0)  # type: ignore[arg-type]
    writer.on_predict_end(trainer, None)  # type: ignore[arg-type]
    assert writer._crf_pool is None and writer.written == len(cams)
    return out


def test_writer_with_a_crf_process_pool_writes_the_same_files(tmp_path: Path) -> None:
    here = _write_all(tmp_path, "here", workers=0)
    pooled = _write_all(tmp_path, "pooled", workers=2)
    files = sorted(p.relative_to(here) for p in here.rglob("*") if p.is_file())
    assert len(files) == 4 * 3 + 1  # masks, cams, rows, one overlay
    assert not list(pooled.rglob("*.tmp*"))
    for rel in files:
        assert (pooled / rel).read_bytes() == (here / rel).read_bytes(), rel
    row = json.loads((here / "rows" / "s1.json").read_text())
    assert row["fg_fraction"] > 0
