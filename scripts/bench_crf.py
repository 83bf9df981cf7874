"""Images/s of the dense CRF (stage 2's ``pseudo=crf``) in threads and in a process pool.

pydensecrf2 holds the GIL, so the writer's threads ran it on one core whatever the machine;
stage 2 now runs it in ``pseudo.crf_workers`` processes (camseg.cam.crf.CRFPool). This
script times, on the same images:

  (a) in-process, one image after the other (``pseudo.crf_workers=0``);
  (b) a pool of threads, each running the CRF in-process (the old writer), for each N;
  (c) a pool of N processes (``pseudo.crf_workers=N``), for each N, started beforehand
      (the start-up, once per stage-2 run, is printed apart).

and prints images/s, the speed-up over (a), the rate per core, the CPU time per image and
how many cores the processes actually got (from /proc: on a shared machine, fewer than N). The inputs are a bright
blob on a darker textured image with a blurred CAM, one class, the CRF of
conf/pseudo/crf.yaml (10 iterations). Goal (issue 15): (c) with 2 processes >= 1.8x (a)
on 2 cores. Example:
    python scripts/bench_crf.py --size 256 --images 16 --workers 1 2
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from camseg.cam.crf import CRFConfig, CRFPool, crf_refine, default_crf_workers

CRF_YAML = dict(
    iterations=10,
    gaussian_sxy=3 / 256,
    gaussian_compat=3.0,
    bilateral_sxy=40 / 256,
    bilateral_srgb=5.0,
    bilateral_compat=10.0,
    bg_power=0.25,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3, help="best of, per row (a shared machine)")
    p.add_argument(
        "--thread-workers", type=int, nargs="*", help="thread counts for (b); default: --workers"
    )
    return p.parse_args()


def inputs(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    blob = torch.exp(-((xx - 0.2) ** 2 + yy**2) / 0.1)
    cam = torch.nn.functional.avg_pool2d(blob[None, None], 9, 1, 4)[0, 0]
    cams = (cam + 0.05 * torch.rand(n, 1, size, size, generator=gen)).clamp(0, 1)
    texture = 20 * torch.rand(n, 1, size, size, generator=gen)
    images = (60 + 120 * (blob > 0.4).float() + texture).clamp(0, 255).to(torch.uint8)
    return (
        cams / cams.amax(dim=(2, 3), keepdim=True),
        images.expand(-1, 3, -1, -1),
        torch.ones(n, 1, dtype=torch.bool),
    )


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """The shortest of ``repeats`` timed calls, seconds."""
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by the processes ``pids`` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:7.2f} img/s"


def main() -> None:
    args = parse_args()
    config = CRFConfig(**{**CRF_YAML, "iterations": args.iterations})
    cams, images, present = inputs(args.images, args.size)
    cores = default_crf_workers()
    print(
        f"dense CRF {args.size}x{args.size}, {args.iterations} iterations, {args.images} images, "
        f"1 class; {cores} cores available (os.sched_getaffinity), {os.cpu_count()} on the machine"
    )
    print(f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    crf_refine(cams[:1], present[:1], images[:1], config)  # imports, first-call costs
    reference = crf_refine(cams, present, images, config)
    cpu = cpu_seconds([os.getpid()])
    base = best_of(args.repeats, lambda: crf_refine(cams, present, images, config))
    cpu = (cpu_seconds([os.getpid()]) - cpu) / (args.repeats * args.images)
    print(
        f"(a) in-process, sequential      {rate(args.images, base)}   1.00x  per core "
        f"{args.images / base:.2f}   CPU {cpu * 1000:.0f} ms/img (= {1 / cpu:.2f} img/s per busy core)"
    )

    def one(i: int) -> torch.Tensor:
        return crf_refine(cams[i : i + 1], present[i : i + 1], images[i : i + 1], config)

    for n in args.workers if args.thread_workers is None else args.thread_workers:
        if n < 2:
            continue
        with ThreadPoolExecutor(n) as threads:
            out = torch.cat(list(threads.map(one, range(args.images))))
            sec = best_of(
                args.repeats, lambda: torch.cat(list(threads.map(one, range(args.images))))
            )
        assert torch.equal(out, reference)
        print(
            f"(b) {n:2d} threads (old writer)     {rate(args.images, sec)}   {base / sec:.2f}x  "
            f"per thread {args.images / sec / n:.2f}"
        )
    for n in args.workers:
        pool = CRFPool(n)
        t = time.perf_counter()
        crf_refine(cams[: max(1, n)], present[: max(1, n)], images[: max(1, n)], config, pool)
        start = time.perf_counter() - t
        out = crf_refine(cams, present, images, config, pool)
        executor = pool._executor()
        pids = list(executor._processes) if executor is not None else [os.getpid()]
        cpu, t = cpu_seconds(pids), time.perf_counter()
        sec = best_of(args.repeats, lambda p=pool: crf_refine(cams, present, images, config, p))
        wall, cpu = time.perf_counter() - t, cpu_seconds(pids) - cpu
        pool.close()
        assert torch.equal(out, reference), "pool result differs from the in-process CRF"
        print(
            f"(c) {n:2d} {'processes' if n > 1 else 'in-process'} (crf_workers)  {rate(args.images, sec)}   {base / sec:.2f}x  "
            f"per process {args.images / sec / max(1, n):.2f}   CPU {cpu / (args.repeats * args.images) * 1000:.0f} ms/img, "
            f"the processes got {cpu / wall:.2f} cores   (start-up + first images {start:.1f} s)"
        )
    print("(c) results equal (a) bit for bit")
    print(f"load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
