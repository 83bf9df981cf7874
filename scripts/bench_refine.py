"""Time and peak memory of the affinity random walk (camseg.refine) against the dense CRF.

Per image, at each size: (a) the affinity refinement as stage 2 runs it (affinity net
forward, local affinities, sparse random walk of the CAMs and the background, upsampling),
(b) the seeds the affinity net learns from (two CRF views, made once per training image),
and (c) the dense CRF of ``conf/pseudo/crf.yaml`` (pydensecrf2) on the same CAMs and image. Each (method, size) runs
in a fresh subprocess so that its peak RSS (``resource.getrusage``) is its own; the RSS
after imports and set-up is printed beside it, so the increase is the method's.

Goals (issue 13): affinity <= 2x the CRF's time per image; peak memory at 512 px < 4 GiB.
Defaults are those of conf/pseudo/affinity.yaml (resnet10t, stride 4, radius 5, beta 8,
32 steps), random weights (timing does not depend on them), one class, CPU.
Example:
    python scripts/bench_refine.py --sizes 256 512 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

GIB = 1024**3


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--radius", type=int, default=5)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--iterations", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    return p.parse_args()


def _rss() -> float:
    """Peak resident memory of this process so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def _inputs(size: int) -> tuple:
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    blob = torch.exp(-((xx - 0.2) ** 2 + yy**2) / 0.1)
    cams = (blob + 0.05 * torch.rand(size, size, generator=gen)).clamp(0, 1)[None, None]
    image = (255 * (0.3 + 0.5 * (blob > 0.4).float())).to(torch.uint8)
    images = image[None, None].expand(1, 3, size, size).contiguous()
    return cams / cams.max(), images, np.asarray(images)


def run_one(method: str, size: int, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    cams, images, _ = _inputs(size)
    present = torch.ones(1, 1, dtype=torch.bool)
    if method == "affinity":
        from camseg.refine.net import AffinityNet
        from camseg.refine.pairs import local_offsets
        from camseg.refine.walk import affinities, walk_with_background

        device = torch.device(args.device)
        net = AffinityNet(stride=args.stride).eval().to(device)
        offsets = local_offsets(args.radius)
        x = ((images.float() / 255.0 - 0.5) / 0.25).to(device)
        c, p = cams.to(device), present.to(device)

        def step() -> None:
            with torch.inference_mode():
                aff = affinities(net(x), offsets)
                walk_with_background(c, p, aff, offsets, 8.0, args.iterations, 1.0)
            if device.type == "cuda":
                torch.cuda.synchronize()
    elif method == "seeds":  # the affinity net's seeds: two CRF views per training image
        from camseg.cam.crf import CRFPool
        from camseg.pseudo.refine_seeds import SeedConfig, seed_masks

        seeds, pool = SeedConfig(), CRFPool(0)

        def step() -> None:
            seed_masks(cams, present, images, seeds, pool)
    else:
        from camseg.cam.crf import CRFConfig, crf_refine

        cfg = CRFConfig(10, 3 / 256, 3, 40 / 256, 5, 10, 0.25)  # conf/pseudo/crf.yaml

        def step() -> None:
            crf_refine(cams, present, images, cfg)

    base = _rss()
    step()  # warm-up (allocator, first-call set-up)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {
        "method": method,
        "size": size,
        "s_per_image": min(times),
        "rss_setup": base,
        "rss_peak": _rss(),
    }


def main() -> None:
    args = parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args)))
        return
    rows = []
    for size in args.sizes:
        for method in ("affinity", "seeds", "crf"):
            cmd = [sys.executable, __file__, "--one", method, str(size)]
            cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
            cmd += ["--radius", str(args.radius), "--stride", str(args.stride)]
            cmd += ["--iterations", str(args.iterations), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"{method} {size}px failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| size | method | s / image | peak RSS GiB | RSS after set-up GiB | vs CRF time |")
    print("|---|---|---|---|---|---|")
    crf = {r["size"]: r["s_per_image"] for r in rows if r["method"] == "crf"}
    for r in rows:
        ratio = r["s_per_image"] / crf[r["size"]] if r["size"] in crf else float("nan")
        print(
            f"| {r['size']} | {r['method']} | {r['s_per_image']:.3f} | {r['rss_peak'] / GIB:.2f} "
            f"| {r['rss_setup'] / GIB:.2f} | {ratio:.2f}x |"
        )


if __name__ == "__main__":
    main()
