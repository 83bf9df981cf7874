"""The README's library snippet runs as written and gives what it promises."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_cam_library_snippet_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README lost its library snippet"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    cams, masks, labels = scope["cams"], scope["masks"], scope["labels"]
    assert cams.shape == (4, 2, 128, 128) and float(cams.min()) >= 0 and float(cams.max()) <= 1
    # Classes absent from an image are never foreground; the negative image is all background.
    for b in range(4):
        present = {k + 1 for k in range(2) if labels[b, k]}
        assert set(masks[b].unique().tolist()) - {0, 255} <= present
    assert not masks[3].any()
    assert torch.isfinite(scope["gradcams"]).all()
