"""Training throughput of stage 1: ClassifierModule through Lightning vs a bare PyTorch loop.

Both sides train the same CamClassifier from the same DataLoader over the same in-memory,
ready-made batches (dicts with camseg's keys ``image`` and ``labels``: data loading is not
what is measured), with the same optimizer (AdamW) and loss (BCE with logits). Lightning
runs ``Trainer.fit`` with ``limit_train_batches`` and no validation, logger, checkpoint or
progress bar. Images/s are counted over ``--steps`` full iterations (fetch, forward,
backward, optimizer step) after ``--warmup`` ones; the two sides alternate ``--repeats``
times and the best block of each is kept, which damps the noise of a shared machine. The
Lightning side includes what ClassifierModule does per step besides the loss (keeping the
step's detached outputs for the epoch's metrics, logging the loss): that is part of the price.

Goal: Lightning's overhead <= 10 %.

Example:
    python scripts/bench_train.py --backbone resnet18 --size 128 --batch 32 --steps 30 --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
import warnings
from collections import Counter
from collections.abc import Iterator

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from camseg.cls.module import ClassifierModule
from camseg.models.classifier import CamClassifier


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--source", default="torchvision", choices=["torchvision", "timm", "smp"])
    p.add_argument("--output-stride", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each block")
    p.add_argument("--repeats", type=int, default=2, help="timed blocks per side (best kept)")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    p.add_argument("--precision", default="32", choices=["32", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--sync-debug",
        action="store_true",
        help="cuda: list the host-device synchronisations of the timed steps, per side and code line",
    )
    return p.parse_args()


class MemoryBatches(Dataset):
    """``length`` ready-made batches (dicts with camseg's keys) cycling over ``unique`` ones.

    Whole batches, not samples: per-sample indexing and collation would cost more than a
    GPU step of a small model and turn both sides into a DataLoader benchmark.
    """

    def __init__(
        self, length: int, unique: int, batch: int, channels: int, size: int, classes: int
    ) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(unique, batch, channels, size, size, generator=g)
        self.labels = (torch.rand(unique, batch, classes, generator=g) > 0.5).float()
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = i % len(self.labels)
        return {"image": self.images[j], "labels": self.labels[j]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_debug(on: bool) -> None:
    """Make every implicit host-device synchronisation warn (cuda only)."""
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn" if on else "default")


@contextlib.contextmanager
def record_syncs(enabled: bool, into: Counter[str]) -> Iterator[None]:
    """Count sync warnings by the code line that caused them."""
    if not enabled:
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if "synchroniz" in str(w.message):
            into[f"{w.filename}:{w.lineno}"] += 1


def make_net(args: argparse.Namespace, device: torch.device) -> CamClassifier:
    torch.manual_seed(0)
    net = CamClassifier(
        args.classes, args.backbone, args.source, args.in_channels, args.output_stride
    )
    return net.to(device)


def optimizer_factory() -> functools.partial:
    return functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=1e-4)


def bare_block(args: argparse.Namespace, loader: DataLoader, device: torch.device) -> float:
    """Images/s of a plain loop over ``warmup + steps`` batches, timed over the last ``steps``."""
    net = make_net(args, device).train()
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = optimizer_factory()(params=net.parameters())
    loss_fn = nn.BCEWithLogitsLoss()
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else contextlib.nullcontext()
    )
    t0 = 0.0
    for i, batch in enumerate(loader):
        x = batch["image"].to(device, non_blocking=True)
        y = batch["labels"].to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i == args.warmup - 1:
            sync(device)
            t0 = time.perf_counter()
            sync_debug(args.sync_debug)
    sync_debug(False)
    sync(device)
    return args.steps * args.batch / (time.perf_counter() - t0)


class StepTimer(L.Callback):
    """Wall time from the end of the last warm-up step to the end of the last step."""

    def __init__(self, warmup: int, steps: int, device: torch.device, debug: bool) -> None:
        self.warmup, self.last, self.device, self.debug = warmup, warmup + steps, device, debug
        self.t0 = self.t1 = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        # Synchronise only where the bare loop does, so both sides queue work alike.
        if trainer.global_step == self.warmup:
            sync(self.device)
            self.t0 = time.perf_counter()
            sync_debug(self.debug)
        elif trainer.global_step == self.last:
            sync_debug(False)
            sync(self.device)
            self.t1 = time.perf_counter()


def lightning_block(args: argparse.Namespace, loader: DataLoader, device: torch.device) -> float:
    net = make_net(args, device)
    module = ClassifierModule(
        net,
        optimizer_factory(),
        [f"c{k}" for k in range(args.classes)],
        multilabel=True,
        channels_last=args.channels_last,
    )
    timer = StepTimer(args.warmup, args.steps, device, args.sync_debug)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
        max_epochs=1,
        limit_train_batches=args.warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return args.steps * args.batch / (timer.t1 - timer.t0)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    import logging

    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def main() -> None:
    args = parse_args()
    warnings.filterwarnings(
        "ignore",
        message=".*(val_dataloader|LeafSpec|does not have many workers|prototype feature).*",
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ds = MemoryBatches(
        args.warmup + args.steps, 4, args.batch, args.in_channels, args.size, args.classes
    )
    # batch_size=None: the dataset yields whole batches; the same loader feeds both sides.
    loader = DataLoader(
        ds, batch_size=None, shuffle=False, num_workers=0, pin_memory=device.type == "cuda"
    )
    bare: list[float] = []
    light: list[float] = []
    syncs: dict[str, Counter[str]] = {"bare": Counter(), "Lightning": Counter()}
    debug = args.sync_debug and device.type == "cuda"
    with quiet_lightning():
        for _ in range(args.repeats):
            with record_syncs(debug, syncs["bare"]):
                bare.append(bare_block(args, loader, device))
            with record_syncs(debug, syncs["Lightning"]):
                light.append(lightning_block(args, loader, device))
    b, lt = max(bare), max(light)
    overhead = 100.0 * (b / lt - 1.0)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()} threads"
    )
    print(
        f"{args.backbone} ({args.source}, os {args.output_stride}) {args.in_channels}x{args.size}x{args.size} "
        f"batch {args.batch}, {args.steps} steps after {args.warmup} warm-up, best of {args.repeats}; "
        f"{name}, precision {args.precision}, channels_last {args.channels_last}"
    )
    print(f"{'':<22}{'images/s':>10}   blocks")
    print(f"{'Lightning':<22}{lt:>10.1f}   {', '.join(f'{v:.1f}' for v in light)}")
    print(f"{'bare PyTorch':<22}{b:>10.1f}   {', '.join(f'{v:.1f}' for v in bare)}")
    print(f"{'overhead (bare/L - 1)':<22}{overhead:>9.1f}%   goal <= 10%")

    if debug:
        for side, counts in syncs.items():
            total = sum(counts.values()) / (args.repeats * args.steps)
            print(f"{side}: {total:.1f} synchronisations per timed step")
            for where, n in counts.most_common(8):
                print(f"  {n:>5}  {where}")


if __name__ == "__main__":
    main()
