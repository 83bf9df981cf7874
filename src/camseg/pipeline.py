"""Run the selected stages of one experiment in pipeline order."""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from camseg import preflight
from camseg.constants import STAGES
from camseg.errors import ConfigError, CoverageStop
from camseg.rundir import RunDir

log = logging.getLogger("camseg")
_SUBDIR_ENV = "CAMSEG_OUTPUT_SUBDIR"


# Stage name -> "module:function" of its runner ``(cfg, run) -> metrics``, imported only when
# the stage runs (a stage's imports are heavy). A new stage is one entry here (and its name
# in ``camseg.constants.STAGES``, which sets the pipeline order).
RUNNERS: dict[str, str] = {
    "cls": "camseg.cls.stage:run_cls",
    "audit": "camseg.audit.stage:run_audit",
    "pseudo": "camseg.pseudo.stage:run_pseudo",
    "seg": "camseg.seg.stage:run_seg",
}


def stage_runner(stage: str) -> Callable[[DictConfig, RunDir], dict[str, Any]]:
    """The runner of ``stage``, looked up when called (so a patched one is found)."""
    module, _, name = RUNNERS[stage].partition(":")
    runner: Callable[[DictConfig, RunDir], dict[str, Any]] = getattr(
        importlib.import_module(module), name
    )
    return runner


def check_stages(stages: Any) -> list[str]:
    if isinstance(stages, str):
        stages = [stages]
    stages = [str(s) for s in (stages or [])]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(
            f"stages={stages}: unknown stage(s) {unknown}; choose from {list(STAGES)}, e.g. stages=[cls,pseudo]"
        )
    if not stages:
        raise ConfigError(f"stages=[]: nothing to run; choose from {list(STAGES)}")
    return [s for s in STAGES if s in stages]


def run_pipeline(cfg: DictConfig) -> float | None:
    """Run ``cfg.stages``; return ``cfg.optimized_metric`` (for sweepers) when set."""
    stages = check_stages(cfg.get("stages"))
    preflight.check_config(cfg)  # run_name, types and ranges: before any path is built
    run = make_rundir(cfg, stages)
    import lightning as L  # imported after the cheap checks: a typo fails in a blink
    import torch
    from lightning.pytorch.utilities import rank_zero_only

    from camseg.report import write_report

    preflight.check_data(cfg, run)  # every image and mask, before stage 1 builds anything

    if cfg.trainer.get("deterministic"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for stage in stages:
        t0 = time.time()
        log.info("=== stage %s: %s ===", stage, run.stage(stage))
        # Each stage starts from the seed itself, so a stage run alone on an existing run
        # directory gives what it gives inside the full pipeline.
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        try:
            results[stage] = stage_runner(stage)(cfg, run)
        except CoverageStop:
            if rank_zero_only.rank == 0:  # type: ignore[attr-defined]
                write_report(cfg, run, {})  # the finding goes on the page too
            raise
        timings[stage] = time.time() - t0
        log.info("=== stage %s done in %.1f s ===", stage, timings[stage])
    report = write_report(cfg, run, timings) if rank_zero_only.rank == 0 else None  # type: ignore[attr-defined]
    if report is not None:
        log.info("report: %s", report)
        print(f"camseg: report written to {report}")
    value = _optimized(cfg, results)
    job = multirun_job()
    if job is not None:
        from camseg.multirun import write_job_result

        write_job_result(job[0], cfg, run, results, value)
    return value


def multirun_job() -> tuple[Path, str] | None:
    """(the sweep's job output dir, job number) when running as one job of ``-m``, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    return Path(hc.runtime.output_dir), str(hc.job.num)


def make_rundir(cfg: DictConfig, stages: list[str]) -> RunDir:
    """The run directory; each job of a sweep writes under ``<run>/multirun/<sweep>/<job>``.

    A job that does not train stage 1 reuses the swept run's classifier (``<run>/cls``).
    """
    base = Path(cfg.paths.runs_dir) / str(cfg.run_name)
    sub = cfg.get("output_subdir")
    fold = (cfg.get("cv") or {}).get("fold")
    if fold is not None:
        # Cross-validation: each fold is a run of its own, <run>/fold<k>, in a multirun too.
        base = base / f"fold{int(fold)}"
        if not sub:
            return RunDir(base)
    job = multirun_job()
    if not sub and job is not None:
        sweep_dir, num = job
        sub = f"multirun/{sweep_dir.parent.name}/{num}"
        # Lightning's DDP re-launches this command per rank as a single run (not a multirun
        # job); the ranks find this job's directory through the environment they inherit.
        os.environ[_SUBDIR_ENV] = sub
    elif not sub and job is None and os.environ.get("LOCAL_RANK", "0") != "0":
        sub = os.environ.get(_SUBDIR_ENV)
    if not sub:
        return RunDir(base)
    return RunDir(base / str(sub), cls_dir=None if "cls" in stages else base / "cls")


def _optimized(cfg: DictConfig, results: dict[str, Any]) -> float | None:
    name = cfg.get("optimized_metric")
    if not name:
        return None
    for stage_result in results.values():
        for section in (
            stage_result,
            stage_result.get("val", {}),
            stage_result.get("test", {}),
            stage_result.get("quality", {}),
        ):
            if isinstance(section, dict) and name in section:
                return float(section[name])
    raise ConfigError(f"optimized_metric='{name}' was not produced by stages {list(results)}")
