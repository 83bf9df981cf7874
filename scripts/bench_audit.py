"""Speed of the CAM audit against pytorch-grad-cam called image by image, for the same work.

The work per image: a Grad-CAM map of its target class, the deletion and insertion curves
(``--steps`` + 1 points each, removed pixels set to 0) and the confidence drop of the
image multiplied by its map. camseg does it batched (:mod:`camseg.audit.faithfulness`,
``--batch`` perturbed images per forward); pytorch-grad-cam one image at a time with its
``GradCAM``, ``PerturbationConfidenceMetric`` (``RemoveMostRelevantFirst`` /
``RemoveLeastRelevantFirst`` at the steps' percentiles) and ``DropInConfidence``. The
numbers of both are compared too (largest absolute difference of the AUCs and drops).

Goal (issue 17): >= 10x on a CPU. Needs the bench extra (``pip install grad-cam``).
Example:
    python scripts/bench_audit.py --images 32 --size 128 --steps 16
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from camseg.audit.faithfulness import (
    FastScorer,
    class_scores,
    confidence_change,
    deletion_insertion,
)
from camseg.cam import build_cam_method, normalize_cams
from camseg.models.classifier import CamClassifier


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch", type=int, default=64, help="camseg: perturbed images per forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args()


def camseg_audit(model, images, targets, steps, batch) -> tuple[np.ndarray, float]:
    engine = build_cam_method("gradcam", model, multilabel=False)
    labels = F.one_hot(targets, model.num_classes).float()
    t0 = time.perf_counter()
    cams = engine(images, labels).float()
    cams = F.interpolate(cams, size=images.shape[-2:], mode="bilinear", align_corners=False)
    maps = normalize_cams(cams.clamp_min(0))[torch.arange(len(targets)), targets]
    score = class_scores(False)
    scorer = FastScorer(model)  # as the audit stage: batch norms folded, channels-last
    with torch.inference_mode():  # the plain images' scores: shared by both measures
        before = score(scorer(images).float())[torch.arange(len(targets)), targets]
    curves = deletion_insertion(scorer, images, maps, targets, score, steps, None, batch, before)
    drop = confidence_change(scorer, images, maps, targets, score, batch, before).drop
    if images.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = torch.stack((curves.deletion_auc, curves.insertion_auc, drop), 1)
    return out.cpu().numpy(), seconds


def gradcam_audit(model, images, targets, steps) -> tuple[np.ndarray, np.ndarray, float]:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    def zero_imputer(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return tensor * keep

    x = np.linspace(0, 1, steps + 1)
    rows, maps = [], []
    t0 = time.perf_counter()
    with GradCAM(model=model, target_layers=[model.encoder]) as gradcam:
        for i in range(len(images)):
            img, t = images[i : i + 1], [ClassifierOutputSoftmaxTarget(int(targets[i]))]
            cam = gradcam(input_tensor=img, targets=t)
            maps.append(cam[0])
            with torch.no_grad():
                full = model(img).softmax(1)[0, int(targets[i])].item()
                empty = model(torch.zeros_like(img)).softmax(1)[0, int(targets[i])].item()
            deletion, insertion = [full], [empty]
            for s in range(1, steps):
                f = s / steps
                for curve, cls, q in (
                    (deletion, RemoveMostRelevantFirst, 100 * (1 - f)),
                    (insertion, RemoveLeastRelevantFirst, 100 * f),
                ):
                    metric = PerturbationConfidenceMetric(cls(q, zero_imputer))
                    curve.append(float(metric(img, cam, t, model, return_diff=False)[0]))
            deletion.append(empty)
            insertion.append(full)
            drop = float(DropInConfidence()(img, cam, t, model)[0])
            rows.append([np.trapezoid(deletion, x), np.trapezoid(insertion, x), drop])
    if images.is_cuda:
        torch.cuda.synchronize()
    return np.array(rows), np.stack(maps), time.perf_counter() - t0


def camseg_metrics(model, images, maps, targets, steps, batch) -> np.ndarray:
    """camseg's numbers on given maps (pytorch-grad-cam's own), for the comparison."""
    score, scorer = class_scores(False), FastScorer(model)
    curves = deletion_insertion(scorer, images, maps, targets, score, steps, None, batch)
    drop = confidence_change(scorer, images, maps, targets, score, batch).drop
    return torch.stack((curves.deletion_auc, curves.insertion_auc, drop), 1).cpu().numpy()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CamClassifier(args.classes, args.backbone, "torchvision", 1, 16, False)
    model = model.to(args.device).eval()
    images = torch.randn(args.images, 1, args.size, args.size, device=args.device)
    with torch.no_grad():
        targets = model(images).argmax(1)
    camseg_audit(model, images[:2], targets[:2], args.steps, args.batch)  # warm-up
    ours, t_ours = camseg_audit(model, images, targets, args.steps, args.batch)
    theirs, their_maps, t_theirs = gradcam_audit(model, images, targets, args.steps)
    same_maps = camseg_metrics(
        model,
        images,
        torch.from_numpy(their_maps).to(images.device),
        targets,
        args.steps,
        args.batch,
    )
    n = args.images
    print(
        f"{args.backbone} {args.size}px, {n} images, {args.steps} steps, {args.device} "
        f"({torch.get_num_threads()} threads): work per image = Grad-CAM, both curves "
        f"({args.steps + 1} points each), confidence drop"
    )
    print(
        f"forwards per image: pytorch-grad-cam {2 * args.steps + 2} at batch 1 (plain, "
        f"baseline, {2 * (args.steps - 1)} perturbed, 2 for the drop); camseg "
        f"{2 * args.steps} + 1/{n} batched (plain, {2 * (args.steps - 1)} perturbed, "
        "multiplied; one baseline image for all)"
    )
    print(f"camseg audit (batched):           {t_ours:8.2f} s  {n / t_ours:8.2f} images/s")
    print(f"pytorch-grad-cam, image by image: {t_theirs:8.2f} s  {n / t_theirs:8.2f} images/s")
    print(f"speed-up: {t_theirs / t_ours:.1f}x (goal >= 10x)")
    for what, a in (("on pytorch-grad-cam's maps", same_maps), ("each on its own maps", ours)):
        diff = np.abs(a - theirs).max(axis=0)
        print(
            f"largest |difference| {what}: deletion AUC {diff[0]:.2e}, insertion AUC "
            f"{diff[1]:.2e}, confidence drop {diff[2]:.2e}"
        )
    print(
        "(the maps differ: pytorch-grad-cam rescales each map to min..max, camseg divides by "
        "the max; the ranking is the same up to ties, the multiplied image is not)"
    )


if __name__ == "__main__":
    main()
