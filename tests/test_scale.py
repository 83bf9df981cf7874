"""Sweeps (Optuna, grid), launchers and DDP, through the real `camseg` command."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
CAMSEG = str(Path(sys.executable).parent / "camseg")
TINY = [
    "debug=fast",
    "data.synthetic.patients=6",
    "data.synthetic.slices_per_patient=4",
    "data.synthetic.size=48",
    "data.num_workers=0",
]


def camseg(root: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [CAMSEG, *args, f"paths.root_dir={root}", *TINY],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scale")
    camseg(root, "run_name=base", "stages=[cls]")
    return root


def test_optuna_sweep_writes_a_summary_with_the_returned_metric(trained: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    camseg(
        trained,
        "-m",
        "run_name=base",
        "hparams_search=pseudo_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "hydra.sweep.dir=" + str(trained / "sweep_optuna"),
    )
    sweep = trained / "sweep_optuna"
    results = sorted(sweep.glob("*/camseg_result.json"))
    assert len(results) == 2
    values = [json.loads(p.read_text())["value"] for p in results]
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert [float(r["pseudo/dice"]) for r in rows] == sorted(values, reverse=True)  # best first
    assert (sweep / "summary.md").read_text().startswith("| rank | job | pseudo/dice |")
    # Each trial wrote its own run directory and reused the base run's classifier.
    for p in results:
        run_dir = Path(json.loads(p.read_text())["run_dir"])
        manifest = json.loads((run_dir / "pseudo" / "manifest.json").read_text())
        assert (run_dir / manifest["classifier"]["checkpoint"]).resolve() == (
            trained / "runs/base/cls/checkpoints/best.ckpt"
        ).resolve()
    assert not (trained / "runs/base/pseudo").exists(), "trials must not write into the swept run"


def test_grid_multirun_gives_each_job_its_own_run_directory(trained: Path) -> None:
    camseg(
        trained,
        "-m",
        "run_name=base",
        "stages=[pseudo]",
        "optimized_metric=pseudo/dice",
        "pseudo.fg_threshold=0.2,0.4",
        "hydra.sweep.dir=" + str(trained / "sweep_grid"),
    )
    fg = []
    for p in sorted((trained / "sweep_grid").glob("*/camseg_result.json")):
        run_dir = Path(json.loads(p.read_text())["run_dir"])
        fg.append(
            json.loads((run_dir / "pseudo/manifest.json").read_text())["policy"]["fg_threshold"]
        )
    assert sorted(fg) == [0.2, 0.4]
    assert (trained / "sweep_grid" / "summary.csv").is_file()


def test_slurm_launcher_config_composes() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "launcher=slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.gpus_per_node=4",
                "hydra.launcher.nodes=2",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.nodes) == ("gpu", 4, 2)
    assert launcher.tasks_per_node == 4


def test_submitit_local_launcher_runs_a_tiny_job(trained: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    camseg(
        trained,
        "-m",
        "launcher=submitit_local",
        "run_name=base",
        "stages=[pseudo]",
        "pseudo.fg_threshold=0.35",
        "hydra.sweep.dir=" + str(trained / "sweep_submitit"),
    )
    results = list((trained / "sweep_submitit").glob("*/camseg_result.json"))
    assert len(results) == 1
    run_dir = Path(json.loads(results[0].read_text())["run_dir"])
    assert (run_dir / "pseudo/manifest.json").is_file()


@pytest.mark.slow
def test_ddp_cam_generation_writes_every_sample_once(trained: Path) -> None:
    """Two CPU processes (gloo) through Trainer.predict: the manifest lists every training sample once."""
    camseg(
        trained,
        "run_name=base",
        "stages=[pseudo]",
        "force=true",
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        timeout=900,
    )
    manifest = json.loads((trained / "runs/base/pseudo/manifest.json").read_text())
    ids = [s["id"] for s in manifest["samples"]]
    assert len(ids) == len(set(ids))
    from camseg.data.folder import load_index
    from camseg.data.splits import assign_splits

    index = load_index(Path(manifest["dataset"]["root"]))
    train = assign_splits(index.samples, 0.15, 0.15, 0)["train"]
    assert sorted(ids) == sorted(s.id for s in train)
    assert len(list((trained / "runs/base/pseudo/rows").glob("*.json"))) == len(ids)


@pytest.mark.slow
def test_ddp_runs_all_three_stages(tmp_path: Path) -> None:
    """Training (cls, seg) and CAM generation under DDP with 2 CPU processes."""
    camseg(
        tmp_path,
        "run_name=ddp",
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        timeout=900,
    )
    run = tmp_path / "runs/ddp"
    for rel in ("cls/metrics.json", "pseudo/manifest.json", "seg/metrics.json", "report.md"):
        assert (run / rel).is_file(), rel
    assert json.loads((run / "seg/metrics.json").read_text())["test"]["test/num_images"] > 0


@pytest.mark.slow
def test_multirun_with_ddp_writes_one_run_directory_per_job(trained: Path) -> None:
    camseg(
        trained,
        "-m",
        "run_name=base",
        "stages=[pseudo]",
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "pseudo.fg_threshold=0.2,0.4",
        "hydra.sweep.dir=" + str(trained / "sweep_ddp"),
        timeout=900,
    )
    dirs = sorted((trained / "runs/base/multirun/sweep_ddp").iterdir())
    assert [d.name for d in dirs] == ["0", "1"]
    fg = [
        json.loads((d / "pseudo/manifest.json").read_text())["policy"]["fg_threshold"] for d in dirs
    ]
    assert fg == [0.2, 0.4]
    # No rank of a job wrote its pseudo-labels anywhere else (e.g. into the base run).
    elsewhere = [
        p
        for p in (trained / "runs").rglob("provenance.json")
        if "sweep_ddp" not in p.parts
        and json.loads(p.read_text())["policy"]["fg_threshold"] in (0.2, 0.4)
    ]
    assert not elsewhere, elsewhere
