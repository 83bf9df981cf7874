"""The ``camseg`` command's user errors: exit status 2 and one line on stderr, no traceback.

Each invocation imports the stack (seconds), so the few commands start together in one
module fixture and the tests read their results.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

CAMSEG = Path(sys.executable).with_name("camseg")

pytestmark = pytest.mark.skipif(
    not CAMSEG.exists(), reason="the camseg console script is not installed"
)

COMMANDS = {
    "unknown_stage": ["stages=[cls,bogus]"],
    "missing_run": ["stages=[pseudo]", "run_name=nope"],
    "unknown_key": ["foo=1"],
    "moved_key": ["seg.arch=FPN"],
}


class Result:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.stdout, self.stderr = proc.communicate(timeout=180)
        self.returncode = proc.returncode

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Result]]]:
    root = tmp_path_factory.mktemp("app")
    env = {k: v for k, v in os.environ.items() if k != "CAMSEG_CONF_DIR"}
    env["HYDRA_FULL_ERROR"] = "0"
    procs = {
        name: subprocess.Popen(
            [str(CAMSEG), *args, f"paths.root_dir={root}"],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in COMMANDS.items()
    }
    try:
        yield root, {name: Result(p) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()


def assert_one_line_error(result: Result) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.error_lines
    assert len(lines) == 1, f"expected one stderr line, got:\n{result.stderr}"
    assert lines[0].startswith("camseg: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def test_unknown_stage(runs: tuple[Path, dict[str, Result]]) -> None:
    line = assert_one_line_error(runs[1]["unknown_stage"])
    assert "'bogus'" in line and "cls" in line and "pseudo" in line and "seg" in line


def test_later_stage_without_its_run_directory(runs: tuple[Path, dict[str, Result]]) -> None:
    root, results = runs
    line = assert_one_line_error(results["missing_run"])
    checkpoint = root / "runs" / "nope" / "cls" / "checkpoints" / "best.ckpt"
    assert str(checkpoint) in line
    assert "stages=[cls]" in line and "run_name=nope" in line  # how to produce it
    assert not (root / "runs" / "nope" / "pseudo").exists()  # refused before writing anything


def test_unknown_config_key(runs: tuple[Path, dict[str, Result]]) -> None:
    line = assert_one_line_error(runs[1]["unknown_key"])
    assert "foo" in line


def test_moved_key_gives_the_new_spelling(runs: tuple[Path, dict[str, Result]]) -> None:
    line = assert_one_line_error(runs[1]["moved_key"])
    assert line == "camseg: error: seg.arch=FPN: seg.arch is now seg.net.arch (seg.net.arch=FPN)"
