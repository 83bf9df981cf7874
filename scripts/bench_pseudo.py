"""End-to-end stage-2 throughput: image loading, multi-scale x flip CAMs, masks and CAMs written.

    python scripts/bench_pseudo.py --images 512 --size 512 --backbone resnet50 --device cuda --precision bf16

Builds a dataset of --images PNGs (copies of a few synthetic slices), a random-init classifier
checkpoint in stage-1 format, runs stage 2 through the real Hydra config (Trainer.predict +
writer), and prints images/s next to the model-only limit: the bare forward throughput of the
same model and batch divided by the cost of the TTA views (sum of scale^2 x 2 flips).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from camseg.cam import CAM, MultiScaleCAM
from camseg.cls.module import ClassifierModule
from camseg.data.synthetic import generate
from camseg.models.classifier import CamClassifier
from camseg.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    """Resident memory of this process (the main one; loader workers are separate)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    """Samples this process's resident memory every 0.1 s while in the ``with`` block."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def make_dataset(root: Path, n: int, size: int) -> None:
    src = generate(root / "src", patients=8, slices_per_patient=8, size=size, seed=0)
    rows = (src / "labels.csv").read_text().splitlines()
    header, body = rows[0], rows[1:]
    out = root / "data"
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    lines = [header]
    for i in range(n):
        image, mask, _group, _slice, label = body[i % len(body)].split(",")
        name = f"B{i:05d}.png"
        shutil.copy(src / image, out / "images" / name)
        shutil.copy(src / mask, out / "masks" / name)
        lines.append(f"images/{name},masks/{name},G{i // 16:04d},{i % 16},{label}")
    (out / "labels.csv").write_text("\n".join(lines) + "\n")


def make_checkpoint(path: Path, backbone: str) -> None:
    net_config = {
        "_target_": "camseg.models.classifier.CamClassifier",
        "num_classes": 1,
        "backbone": backbone,
        "source": "torchvision",
        "in_channels": 1,
        "output_stride": 16,
        "pretrained": False,
        "dropout": 0.0,
    }
    net = CamClassifier(**{k: v for k, v in net_config.items() if k != "_target_"})
    module = ClassifierModule(
        net, optimizer=torch.optim.AdamW, class_names=["hemorrhage"], net_config=net_config
    )
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)


@torch.inference_mode()
def throughputs(
    backbone: str, size: int, batch: int, device: str, bf16: bool, scales: list[float]
) -> tuple[float, float]:
    """Images/s of the bare forward and of the CAM engine alone (multi-scale x flip on a
    batch already in memory), same model and batch as the stage; best of 3 timed blocks."""
    net = CamClassifier(1, backbone, in_channels=1, output_stride=16).to(device).eval()
    engine = MultiScaleCAM(CAM(net), scales=scales, flip=True)
    x = torch.randn(batch, 1, size, size, device=device)
    labels = torch.ones(batch, 1, device=device)
    ctx = (
        torch.autocast(device, dtype=torch.bfloat16)
        if bf16
        else torch.autocast(device, enabled=False)
    )

    def best_rate(fn: Callable[[], object], iters: int) -> float:
        fn()
        best = float("inf")
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return batch * iters / best

    with ctx:
        return best_rate(lambda: net(x), 10), best_rate(lambda: engine(x, labels), 2)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="32", choices=("32", "bf16"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 1.5, 2.0])
    ap.add_argument("--save-cams", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    bf16 = args.precision == "bf16"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_dataset(root, args.images, args.size)
        make_checkpoint(root / "runs/bench/cls/checkpoints/best.ckpt", args.backbone)
        prep = time.perf_counter() - t0
        overrides = [
            f"paths.root_dir={root}",
            "run_name=bench",
            "stages=[pseudo]",
            "data=default",
            f"data.root={root / 'data'}",
            f"data.image_size={args.size}",
            "data.in_channels=1",
            "data.val_fraction=0",
            "data.test_fraction=0",
            f"data.num_workers={args.workers}",
            f"pseudo.batch_size={args.batch}",
            f"pseudo.save_cams={args.save_cams}",
            "pseudo.overlays=8",
            f"cam.scales=[{','.join(map(str, args.scales))}]",
            f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
            f"trainer.precision={'bf16-mixed' if bf16 else '32-true'}",
            "trainer.enable_progress_bar=false",
        ]
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            run_pipeline(cfg)
        wall = time.perf_counter() - t0
        written = len(list((root / "runs/bench/pseudo/masks").glob("*.png")))
    fwd, engine = throughputs(args.backbone, args.size, args.batch, args.device, bf16, args.scales)
    views = sum(s * s for s in args.scales) * 2
    limit = fwd / views
    e2e = written / wall
    dev = (
        torch.cuda.get_device_name(0)
        if args.device == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    n = len(args.scales)
    print(
        f"stage 2 end to end: {args.backbone} {args.size}px batch {args.batch} {args.precision}, "
        f"{dev}, {args.workers} loader workers"
    )
    print("| measure | images/s | vs limit |")
    print("|---|---|---|")
    print(f"| bare forward (model only) | {fwd:.1f} | |")
    print(
        f"| model-only limit for {n} scales x flip (forward / {views:.2f}) | {limit:.1f} | 1.00 |"
    )
    print(
        f"| CAM engine alone ({n} scales x flip, batch in memory) | {engine:.1f} | {engine / limit:.2f} |"
    )
    what = "masks + CAMs" if args.save_cams else "masks"
    print(
        f"| stage 2 end to end ({written} images: load, CAMs, {what} written) "
        f"| {e2e:.1f} | {e2e / limit:.2f} |"
    )
    print(
        f"goal: end to end >= 0.85 x limit: {e2e / limit:.2f}; "
        f"of which the pipeline (loading, writing) keeps {e2e / engine:.2f} of the engine's rate"
    )
    print(f"(dataset preparation {prep:.1f} s, stage wall time {wall:.1f} s including start-up)")
    print(
        f"main process RSS: {mem.start:.0f} MiB before the stage, peak {mem.peak:.0f} MiB during it "
        "(run with several --images to check that it does not grow with the dataset)"
    )


if __name__ == "__main__":
    main()
