"""The ``camseg`` command: one Hydra app over ``conf/config.yaml``.

Errors caused by the user's input are printed as one line (``camseg: error: ...``)
and exit with status 2; everything else keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from camseg.errors import CamsegError

log = logging.getLogger("camseg")


def conf_dir() -> str:
    """The ``conf/`` directory: ``$CAMSEG_CONF_DIR`` or the source checkout's (editable install)."""
    env = os.environ.get("CAMSEG_CONF_DIR")
    if env:
        return str(Path(env).resolve())
    return str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from camseg.pipeline import run_pipeline

    try:
        return run_pipeline(cfg)
    except CamsegError as e:
        print(f"camseg: error: {e}", file=sys.stderr)
        sys.exit(2)


def _precheck_overrides(argv: list[str]) -> str | None:
    """Compose the config with the command line's overrides; return a one-line error or None.

    Hydra reports a bad override (unknown key, unknown group option) in several lines;
    single runs are checked here first so the user gets one line. Sweeps (``-m``) are
    left to Hydra, since their values are not single overrides.
    """
    if any(a in ("-m", "--multirun") for a in argv) or any(
        a.startswith("-") and a not in ("--cfg", "-c") for a in argv
    ):
        return None
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    if not overrides:
        return None
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()
        msg = " ".join(line.strip() for line in first[:2] if line.strip())
        if e.__cause__ is not None:  # the reason, e.g. "Key 'x' is not in struct"
            msg += f" ({str(e.__cause__).strip().splitlines()[0]})"
        return msg or type(e).__name__
    # Before Hydra makes its log folder, which is named after run_name.
    from camseg.preflight import check_config

    try:
        check_config(cfg)
    except CamsegError as e:
        return str(e)
    return None


def main() -> None:
    if not Path(conf_dir(), "config.yaml").is_file():
        print(
            f"camseg: error: config directory {conf_dir()} not found; install camseg editable from its source "
            "checkout (make install) or set CAMSEG_CONF_DIR",
            file=sys.stderr,
        )
        sys.exit(2)
    error = _precheck_overrides(sys.argv[1:])
    if error:
        print(f"camseg: error: {error}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
