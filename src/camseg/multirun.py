"""Sweeps: each job records its result; a Hydra callback writes one summary table per sweep.

Works with plain grid multirun and the Optuna sweeper alike (``camseg -m ...``): every job
writes ``<job output dir>/camseg_result.json``, and at the end of the sweep
:class:`SweepSummary` collects them into ``summary.csv`` and ``summary.md`` under the
sweep directory, best trial first.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from camseg.rundir import RunDir
from camseg.utils.io import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)
RESULT_FILE = "camseg_result.json"


def _flat(results: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for stage in results.values():
        for section in (stage.get("val", {}), stage.get("test", {}), stage.get("quality", {})):
            for k, v in section.items():
                if isinstance(v, int | float) and not k.endswith(("_std",)) and k.count("_") < 3:
                    out[k] = float(v)
    return out


def write_job_result(
    job_dir: Path, cfg: DictConfig, run: RunDir, results: dict[str, Any], value: float | None
) -> None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    write_json_atomic(
        job_dir / RESULT_FILE,
        {
            "job": int(hc.job.num),
            "overrides": list(hc.overrides.task),
            "optimized_metric": cfg.get("optimized_metric"),
            "value": value,
            "run_dir": str(run.root),
            "metrics": _flat(results),
        },
    )


def summarize_sweep(sweep_dir: Path, direction: str = "maximize") -> tuple[Path, Path] | None:
    """Collect the jobs' results under ``sweep_dir`` into summary.csv / summary.md (best first)."""
    rows = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob(f"*/{RESULT_FILE}"))]
    if not rows:
        return None
    sign = -1.0 if direction == "maximize" else 1.0

    def key(r: dict[str, Any]) -> float:
        v = r.get("value")
        return math.inf if v is None else sign * float(v)

    rows.sort(key=key)
    metric = rows[0].get("optimized_metric") or "value"
    metric_cols = sorted({k for r in rows for k in r["metrics"]} - {metric})[:12]
    header = ["rank", "job", str(metric), "overrides", *metric_cols, "run_dir"]
    table = [
        [
            i + 1,
            r["job"],
            r.get("value"),
            " ".join(r["overrides"]),
            *[r["metrics"].get(c) for c in metric_cols],
            r["run_dir"],
        ]
        for i, r in enumerate(rows)
    ]
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *table])
    write_text_atomic(sweep_dir / "summary.csv", buf.getvalue())

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("–" if v is None else str(v))

    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table]
    write_text_atomic(sweep_dir / "summary.md", "\n".join(md) + "\n")
    return sweep_dir / "summary.csv", sweep_dir / "summary.md"


class SweepSummary(Callback):
    """Hydra callback: after a multirun, write the sweep's summary table."""

    def __init__(self, direction: str = "maximize") -> None:
        self.direction = direction

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        out = summarize_sweep(sweep_dir, self.direction)
        if out is not None:
            log.info("sweep summary: %s", out[1])
            print(f"camseg: sweep summary written to {out[1]}")
        # Cross-validation (cv.fold=0,1,...): one summary per run whose jobs wrote fold<k>.
        from camseg.cv import summarize_sweep_runs

        runs = [json.loads(p.read_text())["run_dir"] for p in sweep_dir.glob(f"*/{RESULT_FILE}")]
        for path in summarize_sweep_runs(runs):
            log.info("cross-validation summary: %s", path)
            print(f"camseg: cross-validation summary written to {path}")
