"""Kept for old command lines: the installed command ``camseg-cam`` (camseg.cam_cli) does this.

python scripts/cam_overlay.py --ckpt CKPT --image IMAGE [--method gradcampp] [--out cam.png]
"""

from __future__ import annotations

from camseg.cam_cli import cli

if __name__ == "__main__":
    cli(prog="cam_overlay.py")
