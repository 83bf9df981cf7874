"""Ignore-aware segmentation losses for stage 3 (training on pseudo-masks).

Every loss takes logits ``(B,K+1,H,W)`` (softmax over channels, channel 0 = background)
and a target ``(B,H,W)`` int64 with values ``0..K`` or ``ignore_index`` (255, the
uncertain band of a pseudo-mask). Ignored pixels contribute nothing: neither to the value
nor to the gradient, whatever the network outputs there. A batch whose target is entirely
ignored gives a loss of exactly 0 with zero gradient (never NaN).

What was checked in segmentation-models-pytorch 0.6 and why some terms are our own:

- ``smp.losses.DiceLoss`` / ``TverskyLoss`` (multiclass, ``ignore_index``) zero both the
  probabilities and the one-hot target at ignored pixels before summing, and zero the
  term of every channel without target pixels: ignore-safe, finite when all ignored.
  Used as they are.
- ``nn.CrossEntropyLoss(ignore_index=...)`` with ``reduction="mean"`` divides by the number
  of valid pixels, which is 0/0 = NaN for an all-ignored batch: replaced by ``_MaskedCE``.
- ``smp.losses.FocalLoss`` in multiclass mode is a one-vs-rest *sigmoid* focal loss per
  channel, which does not match the softmax the network is decoded with, and its mean
  over an empty selection is NaN: replaced by ``SoftmaxFocalLoss``.
- ``smp.losses.LovaszLoss`` drops ignored pixels correctly, but for an all-ignored batch
  returns an empty ``(0,C)`` tensor instead of a scalar: wrapped by ``_SafeLovasz``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from camseg.constants import IGNORE_INDEX
from camseg.errors import ConfigError

LOSS_NAMES = ("dice_ce", "ce", "dice", "focal", "focal_dice", "lovasz", "tversky")


def _check_shapes(logits: torch.Tensor, target: torch.Tensor, num_classes: int | None) -> None:
    wrong_channels = num_classes is not None and logits.shape[1] != num_classes + 1
    if logits.ndim != 4 or wrong_channels or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"segmentation loss: logits {tuple(logits.shape)} and target {tuple(target.shape)} "
            f"do not match; expected logits (B,K+1,H,W) and target (B,H,W) with K={num_classes}"
        )


def _safe_mean(total: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """``total / denom``, or ``total`` (which is then 0) where nothing was valid.

    ``torch.where`` on the denominator rather than on the quotient: a NaN in the unused
    branch would still poison the gradient.
    """
    return total / torch.where(denom > 0, denom, torch.ones_like(denom))


class _MaskedCE(nn.Module):
    """Pixel-wise softmax cross-entropy, mean over non-ignored pixels, 0 if there are none.

    With ``weight`` the mean is weighted like ``nn.CrossEntropyLoss``: divided by the sum of
    the weights of the valid pixels' target classes.
    """

    weight: torch.Tensor | None

    def __init__(self, ignore_index: int, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_pixel = F.cross_entropy(
            logits, target, weight=self.weight, ignore_index=self.ignore_index, reduction="none"
        )
        valid = target != self.ignore_index
        if self.weight is None:
            denom = valid.sum().float()
        else:
            safe_target = torch.where(valid, target, torch.zeros_like(target))
            denom = (self.weight.float()[safe_target] * valid).sum()
        # float32 sums: a bf16 pixel count is exact only up to 256.
        return _safe_mean(per_pixel.float().sum(), denom)


class SoftmaxFocalLoss(nn.Module):
    """Multiclass focal loss ``-(1 - p_t)^gamma log p_t`` on the softmax of the logits.

    Mean over non-ignored pixels (0 if there are none). ``weight`` (K+1 floats) multiplies
    each pixel's term by the weight of its target class (the per-class alpha of the focal
    loss paper); the mean is still over the pixel count, as in RetinaNet.
    """

    weight: torch.Tensor | None

    def __init__(
        self, ignore_index: int, gamma: float = 2.0, weight: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ConfigError(f"seg.loss.gamma={gamma}: the focal exponent must be >= 0")
        self.ignore_index = ignore_index
        self.gamma = gamma
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none")
        # 1 - p_t = -expm1(-ce), exact for confident pixels. The clamp keeps the gradient of
        # (1 - p_t)^gamma finite at p_t = 1 (ignored pixels have ce = 0) when gamma < 1.
        focal = (-torch.expm1(-ce)).clamp_min(1e-12).pow(self.gamma) * ce
        valid = target != self.ignore_index
        if self.weight is not None:
            safe_target = torch.where(valid, target, torch.zeros_like(target))
            focal = focal.float() * self.weight.float()[safe_target]
        return _safe_mean(focal.float().sum(), valid.sum().float())


class _SafeLovasz(nn.Module):
    """smp's multiclass Lovasz-softmax, a scalar 0 where no pixel is valid.

    With ``per_image`` the mean runs over the images that have a valid pixel: smp's own
    per-image mode adds an empty tensor for an all-ignored image, which empties the sum.
    """

    def __init__(self, ignore_index: int, per_image: bool = False) -> None:
        super().__init__()
        self.per_image = per_image
        self.inner = smp.losses.LovaszLoss(mode="multiclass", ignore_index=ignore_index)

    def _one(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        loss = self.inner(logits, target)
        # smp returns an empty (0,C) tensor when every pixel is ignored.
        return loss if isinstance(loss, torch.Tensor) and loss.ndim == 0 else None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pairs = zip(logits.split(1), target.split(1)) if self.per_image else [(logits, target)]
        losses = [loss for lg, tg in pairs if (loss := self._one(lg, tg)) is not None]
        if not losses:
            return logits.sum() * 0.0
        return torch.stack(losses).mean()


class SegLoss(nn.Module):
    """A weighted sum of named loss terms: ``sum_i w_i * term_i(logits, target)``.

    Args:
        terms: name -> loss module, each ``(logits (B,K+1,H,W), target (B,H,W)) -> scalar``.
        weights: name -> weight; a missing name has weight 1.
        num_classes: K; if given, logits must have K+1 channels.
    """

    def __init__(
        self,
        terms: Mapping[str, nn.Module],
        weights: Mapping[str, float] | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if not terms:
            raise ConfigError("seg.loss: no loss term given; name at least one")
        self.terms = nn.ModuleDict(dict(terms))
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.terms))
        if unknown:
            raise ConfigError(
                f"seg.loss: weights for unknown terms {unknown}; terms are {list(self.terms)}"
            )
        self.num_classes = num_classes
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.terms}

    def components(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every term's unweighted value (``{"dice": ..., "ce": ...}``); training logs only the sum."""
        _check_shapes(logits, target, self.num_classes)
        # Losses in float32 whatever the model's precision: smp's Lovasz fails on bf16 logits
        # and its Dice sums would lose precision in half types.
        logits = logits.float()
        return {name: term(logits, target) for name, term in self.terms.items()}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args: logits (B,K+1,H,W); target (B,H,W) int64. Returns: a scalar tensor."""
        parts = self.components(logits, target)
        return torch.stack([self.weights[n] * v for n, v in parts.items()]).sum()


# The terms of each loss, in the order they are summed.
_LOSS_TERMS: dict[str, tuple[str, ...]] = {
    "dice_ce": ("dice", "ce"),
    "ce": ("ce",),
    "dice": ("dice",),
    "focal": ("focal",),
    "focal_dice": ("focal", "dice"),
    "lovasz": ("lovasz",),
    "tversky": ("tversky",),
}


def _class_weight_tensor(
    num_classes: int, class_weights: Sequence[float] | None
) -> torch.Tensor | None:
    """Check there are K+1 class weights and return them as float32 (None when not given)."""
    if class_weights is None:
        return None
    if len(class_weights) != num_classes + 1:
        raise ConfigError(
            f"seg.loss.class_weights has {len(class_weights)} values; give {num_classes + 1} "
            "(background first, then one per class)"
        )
    return torch.tensor([float(w) for w in class_weights], dtype=torch.float32)


def build_loss(
    name: str = "dice_ce",
    *,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    focal_weight: float = 1.0,
    gamma: float = 2.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    class_weights: Sequence[float] | None = None,
    dice_include_background: bool = True,
    lovasz_per_image: bool = False,
) -> SegLoss:
    """Build the stage-3 loss by name.

    Args:
        name: one of ``LOSS_NAMES``: ``dice_ce`` (Dice + CE), ``ce``, ``dice``, ``focal``
            (softmax focal), ``focal_dice`` (focal + Dice), ``lovasz`` (Lovasz-softmax),
            ``tversky``.
        num_classes: K, the number of foreground classes (the logits have K+1 channels).
        ignore_index: target value that contributes nothing (the pseudo-masks' 255).
        dice_weight: weight of the Dice term in ``dice_ce``, ``dice``, ``focal_dice``.
        ce_weight: weight of the CE term in ``dice_ce`` and ``ce``.
        focal_weight: weight of the focal term in ``focal`` and ``focal_dice``.
        gamma: focal exponent.
        alpha: Tversky weight of false positives.
        beta: Tversky weight of false negatives (``alpha = beta = 0.5`` is Dice).
        class_weights: K+1 per-channel weights (background first) for CE, focal and Dice.
        dice_include_background: whether channel 0 takes part in Dice / Tversky.
        lovasz_per_image: Lovasz per image then averaged, instead of over the batch.

    Raises:
        ConfigError: unknown name, bad number of classes or of class weights.
    """
    if name not in LOSS_NAMES:
        raise ConfigError(
            f"seg.loss.name='{name}': unknown loss; choose one of {', '.join(LOSS_NAMES)}"
        )
    if num_classes < 1:
        raise ConfigError(f"seg.loss.num_classes={num_classes}: need at least 1 foreground class")
    weight = _class_weight_tensor(num_classes, class_weights)
    dice_channels = None if dice_include_background else list(range(1, num_classes + 1))
    dice_kw = {
        "mode": "multiclass",
        "classes": dice_channels,
        "ignore_index": ignore_index,
        "class_weights": class_weights if class_weights is None else list(class_weights),
    }
    factories: dict[str, Callable[[], nn.Module]] = {
        "dice": lambda: smp.losses.DiceLoss(**dice_kw),
        "ce": lambda: _MaskedCE(ignore_index, weight),
        "focal": lambda: SoftmaxFocalLoss(ignore_index, gamma=gamma, weight=weight),
        "lovasz": lambda: _SafeLovasz(ignore_index, per_image=lovasz_per_image),
        "tversky": lambda: smp.losses.TverskyLoss(alpha=alpha, beta=beta, **dice_kw),
    }
    # Lovasz and Tversky are single unweighted terms.
    term_weights = {"dice": dice_weight, "ce": ce_weight, "focal": focal_weight}
    terms = {term: factories[term]() for term in _LOSS_TERMS[name]}
    weights = {term: term_weights[term] for term in terms if term in term_weights}
    return SegLoss(terms, weights, num_classes=num_classes)
