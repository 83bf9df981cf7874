"""The ``camseg`` command: one Hydra app over ``conf/config.yaml`` (see :func:`conf_dir`).

Errors caused by the user's input are printed as one line (``camseg: error: ...``)
and exit with status 2; everything else keeps its traceback.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from camseg.errors import CamsegError

log = logging.getLogger("camseg")


CONF_PACKAGE = "camseg.conf"


def conf_dir() -> str:
    """Where the config tree is, as Hydra's ``config_path``.

    In order: ``$CAMSEG_CONF_DIR``; the source checkout's top-level ``conf/`` (an editable
    install, or ``PYTHONPATH=src``); else the wheel's copy, the package ``camseg.conf``, as
    ``pkg://camseg.conf``. Run folders do not depend on it: ``paths.root_dir`` is the
    working directory.
    """
    env = os.environ.get("CAMSEG_CONF_DIR")
    if env:
        return str(Path(env).resolve())
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf" / "config.yaml").is_file():
        return str(checkout / "conf")
    if importlib.util.find_spec(CONF_PACKAGE) is not None:
        return f"pkg://{CONF_PACKAGE}"
    return str(checkout / "conf")


def _has_config(source: str) -> bool:
    if source.startswith("pkg://"):
        return importlib.resources.files(source[len("pkg://") :]).joinpath("config.yaml").is_file()
    return Path(source, "config.yaml").is_file()


def _initialize(source: str) -> Any:
    """Hydra's compose API over ``source`` (a folder or ``pkg://module``)."""
    from hydra import initialize_config_dir, initialize_config_module

    if source.startswith("pkg://"):
        return initialize_config_module(config_module=source[len("pkg://") :], version_base="1.3")
    return initialize_config_dir(config_dir=source, version_base="1.3")


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
    left to Hydra, since their values are not single overrides; keys that moved are
    refused in both, with their new spelling.
    """
    from camseg.preflight import check_config, check_overrides

    try:
        check_overrides([a for a in argv if not a.startswith("-") and "=" in a])
    except CamsegError as e:
        return str(e)
    if any(a in ("-m", "--multirun") for a in argv) or any(
        a.startswith("-") and a not in ("--cfg", "-c") for a in argv
    ):
        return None
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    if not overrides:
        return None
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with _initialize(conf_dir()):
            cfg = compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()
        msg = " ".join(line.strip() for line in first[:2] if line.strip())
        if e.__cause__ is not None:  # the reason, e.g. "Key 'x' is not in struct"
            msg += f" ({str(e.__cause__).strip().splitlines()[0]})"
        return msg or type(e).__name__
    # Before Hydra makes its log folder, which is named after run_name.
    try:
        check_config(cfg)
    except CamsegError as e:
        return str(e)
    return None


def main() -> None:
    if not _has_config(conf_dir()):
        print(
            f"camseg: error: config directory {conf_dir()} not found (no config.yaml); set "
            "CAMSEG_CONF_DIR to a camseg conf/ folder, or reinstall camseg (its wheel ships "
            "the config as camseg.conf)",
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
