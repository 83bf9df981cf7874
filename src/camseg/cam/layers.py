"""Target layers named by strings, and the one place where hooks live.

Layers are resolved through ``named_modules()`` (never ``eval``). Hooks exist only
inside :class:`ActivationsAndGrads`, whose ``__exit__`` removes them and restores the
model's train/eval flags and ``requires_grad`` states, also when the body raises.
"""

from __future__ import annotations

import difflib
from collections import Counter
from types import TracebackType
from typing import Any

import torch
from torch import nn

from camseg.cam.base import eval_mode
from camseg.errors import ConfigError

_PROBE_SIZE = 64


def resolve_target_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; a ConfigError listing candidates otherwise."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=8, cutoff=0.6)
    shown = close if close else names[-15:]
    kind = "close matches" if close else "last module names"
    raise ConfigError(
        f"cam.target_layer='{name}': no such module in {type(model).__name__}; "
        f"{kind}: {', '.join(shown)} (all names: dict(model.named_modules()))"
    )


def _probe_input(model: nn.Module) -> torch.Tensor:
    channels = getattr(model, "in_channels", None)
    if not isinstance(channels, int):
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise ConfigError(
                f"cam.target_layer: cannot guess a default layer for {type(model).__name__} "
                "(no Conv2d found); set cam.target_layer to a module name"
            )
        channels = conv.in_channels
    param = next(model.parameters())
    return torch.zeros(
        1, channels, _PROBE_SIZE, _PROBE_SIZE, device=param.device, dtype=param.dtype
    )


def default_target_layer(model: nn.Module, example: torch.Tensor | None = None) -> str:
    """Name of the module that produces the model's last feature map.

    For a model with ``features(x)`` (CamClassifier): the deepest block whose output
    *is* the tensor ``features(x)`` returns (e.g. ResNet's last block), so Grad-CAM
    there sees exactly the map plain CAM uses. For any other model: the last module
    to finish with a spatial 4D output. Found by one probe forward (64 px zeros, or
    ``example``) with temporary hooks; modules called more than once per forward
    (shared activations) are skipped, as their hooks would fire several times.
    """
    x = _probe_input(model) if example is None else example
    finished: list[tuple[str, Any]] = []
    calls: Counter[str] = Counter()
    named = [(n, m) for n, m in model.named_modules() if n]

    def record(name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            calls[name] += 1
            finished.append((name, output))

        return hook

    features = getattr(model, "features", None)
    handles = [m.register_forward_hook(record(n)) for n, m in named]
    try:
        with eval_mode(model), torch.no_grad():
            out = features(x) if callable(features) else model(x)
    finally:
        for h in handles:
            h.remove()
    once = [(n, o) for n, o in finished if calls[n] == 1]
    if callable(features):
        same = [n for n, o in once if o is out]
        if same:
            children = {n: any(True for _ in m.children()) for n, m in named}
            blocks = [n for n in same if children[n]] or same
            return max(blocks, key=lambda n: n.count("."))
    spatial = [
        n
        for n, o in once
        if isinstance(o, torch.Tensor) and o.ndim == 4 and o.shape[-2:].numel() > 1
    ]
    if not spatial:
        raise ConfigError(
            f"cam.target_layer: no module of {type(model).__name__} outputs a spatial (B,C,h,w) map; "
            "set cam.target_layer to a module name"
        )
    return spatial[-1]


class ActivationsAndGrads:
    """Capture one layer's activation, and take gradients of scores with respect to it.

    Use only as a context manager::

        with ActivationsAndGrads(model, "encoder.body.7") as ag:
            logits = ag.forward(images)
            grad = ag.gradient(logits[:, k].sum())

    On entry: the model goes to eval mode, every parameter's ``requires_grad`` is
    switched off (so no graph is built below the target layer and no ``.grad`` is
    ever written), and a forward hook is registered on the layer. With
    ``need_grads=True`` the hook replaces the layer's output by a detached leaf that
    requires grad (and passes a clone of it on, so that in-place ops further down
    cannot invalidate it); gradients are then taken with ``torch.autograd.grad``
    w.r.t. that leaf, which walks only the part of the graph above the layer. On
    exit, in ``finally``: the hook is removed and the flags are restored.
    """

    def __init__(self, model: nn.Module, target_layer: str, need_grads: bool = True) -> None:
        self.model = model
        self.target_layer = target_layer
        self.layer = resolve_target_layer(model, target_layer)
        self.need_grads = need_grads
        self.activation: torch.Tensor | None = None
        self._calls = 0
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._modes: list[tuple[nn.Module, bool]] = []
        self._requires_grad: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> ActivationsAndGrads:
        self._modes = [(m, m.training) for m in self.model.modules()]
        self._requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            self.model.eval()
            for p, _ in self._requires_grad:
                p.requires_grad_(False)
            self._handle = self.layer.register_forward_hook(self._hook)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        try:
            if self._handle is not None:
                self._handle.remove()
        finally:
            self._handle = None
            self.activation = None
            for module, training in self._modes:
                module.training = training
            for p, flag in self._requires_grad:
                p.requires_grad_(flag)
            self._modes, self._requires_grad = [], []

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor):
            raise ConfigError(
                f"cam.target_layer='{self.target_layer}': outputs {type(output).__name__}, "
                "not a tensor; pick a module that returns a (B,C,h,w) tensor"
            )
        self._calls += 1
        if not self.need_grads:
            self.activation = output.detach()
            return None
        leaf = output.detach().requires_grad_(True)
        self.activation = leaf
        return leaf.clone()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Run the model once and return its output (logits); the activation is kept."""
        if self._handle is None:
            raise RuntimeError("ActivationsAndGrads.forward must be called inside its `with` block")
        self._calls = 0
        self.activation = None
        out = self.model(images)
        if self._calls != 1:
            raise ConfigError(
                f"cam.target_layer='{self.target_layer}': the module ran {self._calls} times in "
                "one forward; pick a module that runs exactly once (e.g. a block, not a shared ReLU)"
            )
        return out

    def gradient(self, score: torch.Tensor, retain_graph: bool = True) -> torch.Tensor:
        """d score / d activation, same shape as the activation."""
        if self.activation is None or not self.activation.requires_grad:
            raise RuntimeError("no activation with gradients captured; call forward() first")
        (grad,) = torch.autograd.grad(score, self.activation, retain_graph=retain_graph)
        return grad
