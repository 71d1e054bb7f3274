"""RecursiveMix (Yang, Li, Zhao, Song, Yang, NeurIPS 2022, arXiv 2203.06844).

Mixing with the learning history: the whole previous (already mixed) batch is
resized into a random box of the current batch, and the targets are mixed by
area with the previous batch's (mixed) targets, so earlier batches recur at
smaller and smaller scales. A consistency term makes the model's prediction
for the box region agree with its prediction for the previous batch:
``omega * (1 - lam) * CE(head(RoIAlign(features, box)), softmax(previous logits))``.

Reference code: implus/RecursiveMix-pytorch (``utils.py``: ``recursive_mix``;
``main.py``: the training step; ``models_cifar/resnet.py``: the RoI branch).
On the same inputs, model and draws, a step here gives the authors' mixed
images, targets, logits, RoI logits and loss (``tests/test_recursivemix.py``
checks it against a local copy). Defaults: the authors' CIFAR command,
``alpha=0.5`` (box area fraction ~ U(0, alpha)) and ``omega=0.1`` (their
ImageNet command and the argument parser's default use 0.5); nearest-neighbour
resizing (their default ``interpolate_mode``).

The history (the previous mixed batch, its mixed targets and its logits) is the
method's state: it goes into ``state_dict()`` (CPU copies; a checkpoint of a
CIFAR run carries about 1.5 MB for batch 128) so that a resumed run is
identical. The RoI branch reads the last feature map of timm's
``forward_features``, pools the box with ``torchvision.ops.roi_align`` (output
1x1, ``aligned=True``, adaptive sampling, scale = feature width / image width)
and classifies it with ``forward_head``; it costs a RoIAlign and one head
evaluation, no second backbone pass.

Deviations, also in the README:

- The RoI prediction uses the model's own head (the authors' ``--share_fc``);
  their default adds a second linear head ``fc_roi`` to the model, which a
  method cannot do to a timm model here (its weights would be outside the
  optimiser and the model's checkpoint).
- The history carries over epoch boundaries; the authors' loop starts every
  epoch with an empty history (one unmixed step per epoch). A batch larger
  than the history (never with the in-memory loader, which drops the last
  partial batch), or of another image size, is not mixed and starts a new
  history.
- The RoI path calls ``forward_features`` and ``forward_head`` of the eager
  model, so with ``--compile`` (the default on CUDA) the mixed steps run
  uncompiled.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mixbench import UsageError
from mixbench.hooks import unwrap

from ._registry import MixMethod, MixOutput, register_method

Box = Tuple[int, int, int, int]  # (y1, y2, x1, x2), half-open


def recursive_box(height: int, width: int, u: float, alpha: float, cy: int, cx: int) -> Box:
    """The authors' box: side ratio ``sqrt(u * alpha)`` (u ~ U(0, 1)), integer centre (cy, cx), clipped."""
    cut = math.sqrt(0.0 + (alpha - 0.0) * u)  # random.uniform(0, alpha) = 0 + (alpha - 0) * random()
    ch, cw = int(height * cut), int(width * cut)
    y1, y2 = min(max(cy - ch // 2, 0), height), min(max(cy + ch // 2, 0), height)
    x1, x2 = min(max(cx - cw // 2, 0), width), min(max(cx + cw // 2, 0), width)
    return y1, y2, x1, x2


def recursive_mix(x: torch.Tensor, old_x: torch.Tensor, y: torch.Tensor, old_y: torch.Tensor, box: Box,
                  mode: str = "nearest") -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Paste the previous batch ``old_x[:N]``, resized, into ``box`` of every sample; mix targets by area.

    Returns (mixed, target, lam) with ``lam`` the fraction of the image outside the box and
    ``target = lam * y + (1 - lam) * old_y[:N]``.
    """
    n = x.shape[0]
    y1, y2, x1, x2 = box
    mixed = x.clone()
    if y2 > y1 and x2 > x1:
        align = None if mode == "nearest" else True
        mixed[:, :, y1:y2, x1:x2] = F.interpolate(old_x[:n], size=(y2 - y1, x2 - x1), mode=mode,
                                                  align_corners=align)
    lam = 1 - ((x2 - x1) * (y2 - y1) / (x.shape[-1] * x.shape[-2]))
    return mixed, lam * y + (1 - lam) * old_y[:n], lam


def roi_logits(model: nn.Module, feats: torch.Tensor, box: Box, image_width: int) -> torch.Tensor:
    """The head's logits for the box region of ``feats`` (N, C, h, w): RoIAlign to 1x1, then ``forward_head``."""
    from torchvision.ops import roi_align

    n = feats.shape[0]
    y1, y2, x1, x2 = box
    rois = torch.tensor([x1, y1, x2, y2], dtype=torch.float32, device=feats.device)[None].expand(n, 4)
    rois = torch.cat([torch.arange(n, device=feats.device, dtype=torch.float32)[:, None], rois], 1)
    # In float32 (under autocast torchvision does the same; bf16 box coordinates would round above 256 px).
    pooled = roi_align(feats.float(), rois, output_size=(1, 1), spatial_scale=feats.shape[-1] / image_width,
                       sampling_ratio=-1, aligned=True)
    return unwrap(model).forward_head(pooled.to(feats.dtype))


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


@register_method
class RecursiveMix(MixMethod):
    """RecursiveMix; ``alpha``: upper bound of the box's area fraction, ``omega``: weight of the RoI consistency term.

    Per batch with a usable history, from the method's generator, in this order
    (the authors' order): ``u ~ U(0, 1)`` for the box size, the box centre's column,
    then its row. The first batch (no history) draws nothing and is not mixed.
    """

    name = "recursivemix"

    def __init__(self, alpha: float = 0.5, omega: float = 0.1, mode: str = "nearest"):
        super().__init__()
        if not 0 <= alpha <= 1:
            raise UsageError(f"recursivemix alpha must be in [0, 1], got {alpha!r}")
        if mode not in ("nearest", "bilinear"):
            raise UsageError(f"recursivemix mode must be 'nearest' or 'bilinear', got {mode!r}")
        self.alpha = alpha
        self.omega = omega
        self.mode = mode
        self._history: Optional[Dict[str, torch.Tensor]] = None

    # -- state: the previous batch --------------------------------------------
    def setup(self, **kwargs) -> None:
        super().setup(**kwargs)
        self._history = None

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["history"] = None if self._history is None else {k: v.detach().cpu().clone()
                                                               for k, v in self._history.items()}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        history = state.get("history")
        self._history = None if history is None else {k: v.clone() for k, v in history.items()}

    def usable_history(self, x: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
        """The history on ``x``'s device, or None when there is none or it does not fit this batch."""
        h = self._history
        if h is None or h["x"].shape[0] < x.shape[0] or h["x"].shape[1:] != x.shape[1:]:
            return None
        if h["x"].device != x.device:
            h = self._history = {k: v.to(x.device) for k, v in h.items()}
        return h

    # -- the step ----------------------------------------------------------------
    def forward(self, model, x, y):
        n, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        history = self.usable_history(x)
        lam, mixed, target = 1.0, x, y
        if history is not None:
            u = float(self.rng.random())
            cx = int(self.rng.integers(width))
            cy = int(self.rng.integers(height))
            box = recursive_box(height, width, u, self.alpha, cy, cx)
            mixed, target, lam = recursive_mix(x, history["x"].to(x.dtype), y, history["y"].to(y.dtype), box,
                                               self.mode)
        extra = None
        if lam < 1.0:
            net = unwrap(model)
            feats = net.forward_features(mixed)
            logits = net.forward_head(feats)
            roi = roi_logits(net, feats, box, width)
            teacher = history["logits"][:n].float().softmax(dim=-1)
            extra = soft_cross_entropy(roi, teacher) * (self.omega * (1.0 - lam))
        else:
            logits = model(mixed)
        self._history = {"x": mixed.detach().clone(), "y": target.detach().clone(),
                         "logits": logits.detach().float().clone()}
        return MixOutput(logits, target, extra)
