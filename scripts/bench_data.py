"""Stage-1 data loading against the model it feeds: is the loader the bottleneck?

For each experiment config (composed as ``camseg experiment=NAME`` would), on its training
split with its own augmentations, size, channels and 2.5D context:

  loader, 0 workers   decode + augment + collate in this process: the rate of one worker;
  loader, N workers   the same through the DataLoader with N worker processes (the total);
  model step          forward + backward + optimizer step of the configured classifier
                      (AdamW, BCE) on random tensors of the loader's batch shape, same device;

then ``loader / model``: below 1, training waits for data. Loader rates are counted after
the first batch (worker start-up apart) over ``--batches`` batches (on over epochs where
the split is shorter).

Datasets: ``synthetic`` generates a small embedded dataset; ``hemorrhage`` runs the CT-ICH
recipe (3 windows x 3 slices = 9 channels, 256 px) on a generated 512 px realistic-hemorrhage
synthetic volume set (no CT-ICH download needed); ``lgg_mri`` reads data.root of its config
(the shared 40-patient LGG set) read-only and is skipped when it is absent. Generated data goes
to ``--data-dir``. Pretrained weights are never downloaded (random weights time the same).
Example:
    python scripts/bench_data.py --experiments synthetic hemorrhage lgg_mri --workers 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from camseg.cls.stage import net_config
from camseg.data.synthetic import generate
from camseg.stage_common import build_datamodule

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experiments", nargs="+", default=["synthetic", "hemorrhage", "lgg_mri"])
    p.add_argument("--workers", type=int, nargs="+", default=[2], help="DataLoader workers")
    p.add_argument(
        "--batches", type=int, default=12, help="timed batches per loader run (over epochs)"
    )
    p.add_argument("--steps", type=int, default=2, help="timed model steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="32", choices=["32", "bf16"])
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "camseg-bench-data"))
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for all")
    return p.parse_args()


def compose_cfg(name: str, data_dir: Path, extra: list[str]) -> DictConfig | None:
    overrides = [f"experiment={name}", f"paths.data_dir={data_dir}", "model.net.pretrained=false"]
    if name == "synthetic":
        overrides += ["data.synthetic.patients=12", "data.synthetic.slices_per_patient=16"]
    if name == "hemorrhage":
        root = data_dir / "bench-realistic-hemorrhage-p4x16-s512"
        if not (root / "labels.csv").is_file():
            generate(
                root, preset="realistic-hemorrhage", patients=4, slices_per_patient=16, size=512
            )
        overrides += [f"data.root={root}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides + extra)
    if name == "lgg_mri" and not (Path(cfg.data.root) / "labels.csv").is_file():
        print(f"{name}: skipped, {cfg.data.root} not found")
        return None
    return cfg


def time_loader(dm: Any, workers: int, batches: int) -> float:
    """Images/s over ``batches`` batches after the first (start-up apart), epoch after epoch."""
    dm.num_workers = workers
    loader = dm.train_dataloader()
    n, t, seen, epoch = 0, 0.0, -1, 0
    while seen < batches:
        loader.dataset.set_epoch(epoch)
        for batch in loader:
            seen += 1
            if seen == 0:
                t = time.perf_counter()
                continue
            n += len(batch["image"])
            if seen >= batches:
                break
        epoch += 1
    return n / (time.perf_counter() - t)


def time_model(cfg: DictConfig, dm: Any, shape: tuple[int, ...], args: argparse.Namespace) -> float:
    net = instantiate(net_config(cfg, dm)).to(args.device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(shape, device=args.device)
    y = torch.randint(0, 2, (shape[0], dm.num_classes), device=args.device).float()
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def step() -> None:
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    net.train()
    step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return args.steps * shape[0] / (time.perf_counter() - t)


def bench(name: str, args: argparse.Namespace) -> None:
    cfg = compose_cfg(name, Path(args.data_dir), args.override)
    if cfg is None:
        return
    dm = build_datamodule(cfg)
    dm.setup("fit")
    dm.num_workers = 0
    first = next(iter(dm.train_dataloader()))
    shape = tuple(first["image"].shape)
    print(
        f"{name}: {len(dm.samples('train'))} training images, batch {shape[0]}, input {shape[1:]} "
        f"(context_slices={dm.context_slices}), model {cfg.model.net.backbone}"
    )
    one = time_loader(dm, 0, args.batches)
    print(f"  loader, 0 workers (one worker): {one:7.1f} img/s")
    totals = {}
    for w in args.workers:
        if w > 0:
            totals[w] = time_loader(dm, w, args.batches)
            print(
                f"  loader, {w} workers (total):    {totals[w]:7.1f} img/s  ({totals[w] / w:.1f} per worker)"
            )
    model = time_model(cfg, dm, shape, args)
    print(f"  model step ({args.device}, {args.precision}):  {model:7.1f} img/s")
    best = max([one, *totals.values()])
    print(
        f"  loader / model: {best / model:.2f}  ({'the loader keeps up' if best >= model else 'the loader is the bottleneck'})"
    )


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    print(
        f"device {args.device}; {len(os.sched_getaffinity(0))} cores; torch threads {torch.get_num_threads()}"
    )
    for name in args.experiments:
        bench(name, args)


if __name__ == "__main__":
    main()
