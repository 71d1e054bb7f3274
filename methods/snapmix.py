"""SnapMix (Huang, Wang, Tao, AAAI 2021, arXiv 2012.04846).

Semantically proportional mixing: a box of the partner image (its own random
size and place) is resized into a random box of the sample, and each label is
weighted by the share of its image's class activation map (CAM) that the mixed
image shows, instead of by area. The CAM comes from the model being trained:
one extra forward pass of the clean batch, without gradient, through timm's
``forward_features``, with the weights of ``get_classifier()``.

Reference code: Shaoli-Huang/SnapMix (``utils/mixmethod.py``: ``get_spm`` and
``snapmix``; ``utils/custom_ops.py``: ``rand_bbox``). On the same inputs, model
and draws, ``snapmix_core`` returns the authors' mixed images bit for bit and
their label weights to float32 rounding (``tests/test_snapmix.py`` checks it
against a local copy). Defaults: the authors' ``prob=1``, ``beta=5`` ("used in
most of the experiments"; the paper has no CIFAR runs), named ``alpha`` here.

The semantic percent map of a sample: ReLU of the last feature map, the 1x1
convolution with the classifier's weights and bias, the map of the sample's
class, bilinearly upsampled to the image, minus its minimum, divided by its sum.
With ``A`` the sample's box and ``B`` the partner's box (resized into ``A``):

- ``lam_a = 1 - spm_own(A) / (spm_own.sum() + 1e-8)`` for the sample's label,
- ``lam_b = spm_partner(B) / (spm_partner.sum() + 1e-8)`` for the partner's,
- when both labels are the same class each weight becomes ``lam_a + lam_b``,
- a NaN weight (a constant CAM) falls back to the box's area.

The two weights need not sum to 1; the authors' loss is
``mean(lam_a * CE(y) + lam_b * CE(y_partner))``. Here the target is the
normalised mix ``(lam_a * y + lam_b * y[perm]) / s`` with ``s = lam_a + lam_b``
(rows sum to 1) and ``MixOutput.extra_loss = mean((s - 1) * CE(target))``, so
that the total soft-target cross-entropy is the authors' loss exactly (a sample
with ``s = 0`` contributes 0, as there; under the ``bce`` loss the harness
weighs the extra term by 1/K, as every extra term).

Cost: the CAM pass is a forward of the clean batch without gradient, about a
third of a training step: a SnapMix step takes about 1.3-1.4x a vanilla step.

Deviations, also in the README:

- The CAM pass runs ``forward_features`` only (the authors run the whole model
  and discard its logits), in the model's current mode (train mode during
  training, as in the authors' code, so batch norms see the clean batch and
  update their running statistics), in float32 even under the run's autocast
  (bf16 on CUDA), as the authors' code computes it. It is skipped when a box
  is empty (then nothing is mixed; the authors compute it anyway).
- The class of a sample is the arg-max of its (soft) target.
- The classifier must be a linear layer or a 1x1 convolution (timm's heads of
  ResNet, ResNetV2, RegNet, EfficientNet...); another head is a usage error.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mixbench import UsageError
from mixbench.hooks import unwrap

from ._registry import MixMethod, MixOutput, register_method
from .cutmix import cutmix_box

Box = Tuple[int, int, int, int]  # (y1, y2, x1, x2), half-open


def classifier_weights(model: nn.Module) -> Tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (K, C), bias (K,) or None) of ``model.get_classifier()``: a Linear or a 1x1 Conv2d."""
    clf = unwrap(model).get_classifier()
    if isinstance(clf, nn.Linear):
        weight = clf.weight
    elif isinstance(clf, nn.Conv2d) and clf.kernel_size == (1, 1) and clf.groups == 1:
        weight = clf.weight.flatten(1)
    else:
        raise UsageError(f"snapmix needs a linear (or 1x1 convolution) classifier for its class activation maps; "
                         f"{type(unwrap(model)).__name__}.get_classifier() is {type(clf).__name__}")
    return weight.detach(), None if clf.bias is None else clf.bias.detach()


def semantic_percent_map(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, H, W) float32 maps, each >= 0 and summing to 1: the CAM of each sample's class at image size.

    One forward of ``x`` through ``forward_features`` without gradient, in the model's current mode,
    in float32 even under autocast (the label weights are the method's output; the authors' code
    computes them in float32), as is the CAM arithmetic.
    """
    net = unwrap(model)
    weight, bias = classifier_weights(net)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        fms = F.relu(net.forward_features(x.float()).float())
        cam = F.conv2d(fms, weight.float()[:, :, None, None], None if bias is None else bias.float())
        cam = cam[torch.arange(x.shape[0], device=x.device), labels.to(x.device)]
        cam = F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        cam = cam - cam.amin((1, 2), keepdim=True)
        return cam / cam.sum((1, 2), keepdim=True)


def snapmix_core(x: torch.Tensor, spm: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor, box: Box,
                 box_b: Box) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste ``x[perm]``'s ``box_b``, resized, into every sample's ``box``; returns (mixed, lam_a, lam_b).

    ``spm`` (N, H, W) the semantic percent maps, ``labels`` (N,) the classes; the
    weights are float32 (N,) on ``x``'s device. Both boxes must be non-empty.
    """
    y1, y2, x1, x2 = box
    b1, b2, a1, a2 = box_b
    if (y2 - y1) * (x2 - x1) <= 0 or (b2 - b1) * (a2 - a1) <= 0:
        raise ValueError(f"snapmix boxes must be non-empty, got {box} and {box_b}")
    patch = F.interpolate(x[perm, :, b1:b2, a1:a2], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=True)
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = patch
    spm = spm.float()
    spm_b = spm[perm]
    lam_a = 1 - spm[:, y1:y2, x1:x2].sum(2).sum(1) / (spm.sum(2).sum(1) + 1e-8)
    lam_b = spm_b[:, b1:b2, a1:a2].sum(2).sum(1) / (spm_b.sum(2).sum(1) + 1e-8)
    same = labels == labels[perm]
    lam_a, lam_b = torch.where(same, lam_a + lam_b, lam_a), torch.where(same, lam_b + lam_a, lam_b)
    area = 1 - (y2 - y1) * (x2 - x1) / (x.shape[-1] * x.shape[-2])
    lam_a = torch.where(torch.isnan(lam_a), torch.full_like(lam_a, area), lam_a)
    lam_b = torch.where(torch.isnan(lam_b), torch.full_like(lam_b, 1 - area), lam_b)
    return mixed, lam_a, lam_b


def soft_cross_entropy_per_sample(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1)


def weighted_targets(y: torch.Tensor, perm: torch.Tensor, lam_a: torch.Tensor,
                     lam_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(target rows summing to 1, per-sample scale s = lam_a + lam_b): ``lam_a y + lam_b y[perm] = s * target``.

    A sample with ``s = 0`` gets its own ``y`` as target (its loss is scaled by 0).
    """
    lam_a, lam_b = lam_a.to(y.dtype)[:, None], lam_b.to(y.dtype)[:, None]
    scale = lam_a + lam_b
    mix = lam_a * y + lam_b * y[perm]
    target = torch.where(scale > 0, mix / scale.clamp_min(torch.finfo(y.dtype).tiny), y)
    return target, scale[:, 0]


@register_method
class SnapMix(MixMethod):
    """SnapMix; ``alpha``: the Beta parameter of both box sizes (the authors' ``beta``), ``prob``: mixing probability.

    Per batch, from the method's generator, in this order (the authors' order): the
    coin for ``prob`` (only when ``prob < 1``), lambda and lambda_b ~ Beta(alpha, alpha),
    the permutation, the sample box's centre (row, column), then the partner box's.
    """

    name = "snapmix"

    def __init__(self, alpha: float = 5.0, prob: float = 1.0):
        super().__init__()
        if not 0 <= prob <= 1:
            raise UsageError(f"snapmix prob must be in [0, 1], got {prob!r}")
        self.alpha = alpha
        self.prob = prob

    def draw_boxes(self, n: int, height: int, width: int, device):
        lam, lam_b = self.draw_lambda(self.alpha), self.draw_lambda(self.alpha)
        perm = self.draw_perm(n, device)
        centre = int(self.rng.integers(height)), int(self.rng.integers(width))
        centre_b = int(self.rng.integers(height)), int(self.rng.integers(width))
        return perm, cutmix_box(height, width, lam, *centre), cutmix_box(height, width, lam_b, *centre_b)

    def forward(self, model, x, y):
        if self.prob < 1 and self.rng.random() >= self.prob:
            return MixOutput(model(x), y)
        perm, box, box_b = self.draw_boxes(x.shape[0], x.shape[-2], x.shape[-1], x.device)
        if (box[1] - box[0]) * (box[3] - box[2]) <= 0 or (box_b[1] - box_b[0]) * (box_b[3] - box_b[2]) <= 0:
            return MixOutput(model(x), y)  # an empty box: nothing is mixed (the authors' weights 1 and 0)
        labels = y.argmax(1)
        spm = semantic_percent_map(model, x, labels)
        mixed, lam_a, lam_b = snapmix_core(x, spm, labels, perm, box, box_b)
        target, scale = weighted_targets(y, perm, lam_a, lam_b)
        logits = model(mixed)
        extra = torch.mean((scale - 1) * soft_cross_entropy_per_sample(logits, target))
        return MixOutput(logits, target, extra)
