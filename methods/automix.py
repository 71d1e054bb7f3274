"""AutoMix (Liu, Li, Wang, Tan, Wu, Li, ECCV 2022, arXiv 2103.13027).

A small learned "MixBlock" turns a stage's feature maps of a sample and of its
partner into a pixel-wise mixing mask; the block is trained, through a momentum
copy of the model, to make mixed samples that the momentum model classifies as
``lam`` of one class and ``1 - lam`` of the other, while the model itself trains
on mixed samples made with the block's (detached) masks.

Reference: Westlake-AI/openmixup, ``openmixup/models/classifiers/automix.py``
(``AutoMixup.forward_train``, ``pixel_mixup``, ``forward_k``, ``forward_q``,
``momentum_update``), ``openmixup/models/heads/pmix_block.py``
(``PixelMixBlock.forward`` with ``lam_concat``/``lam_mul``/``x_qk_concat``/
``value_neck_cfg`` off, ``embedded_gaussian``, ``mask_loss`` "L1"),
``openmixup/core/hooks/momentum_hook.py`` (``CosineScheduleHook``), with the
CIFAR-100 settings of ``configs/classification/cifar100/automix/basic/
r18_l2_a2_near_L1_01_mlr5e_2.py``: ``alpha=2``, ``momentum=0.999`` raised to
``end_momentum=0.999999`` by the cosine hook (``adjust_scope=[0.1, 1]``,
``warming_up="constant"``), ``mask_layer=2`` (the output of the third stage,
256 channels of a ResNet-18), ``mask_loss=0.1`` with ``mask_loss_margin=0.1``,
``mask_adjust=0``, ``lam_margin=0.08``, the block ``reduction=2``,
``use_scale=True``, ``unsampling_mode="nearest"``, every head weight 1, and the
MixBlock in the model's optimizer group (same lr, momentum, weight decay).

One step (``forward``), in the reference's order:

1. draws from ``self.rng``: ``lam_mb, lam_bb ~ Beta(alpha, alpha)`` (one call of
   size 2, as ``np.random.beta(alpha, alpha, 2)``), then the permutation of the
   backbone's mix ``perm_bb``, then the MixBlock's ``perm_mb``, then (only when
   ``mask_adjust > 0``) one uniform for the mask adjustment;
2. the momentum model's feature map at stage ``mask_layer`` of the clean batch
   (no gradient);
3. the MixBlock's masks for ``perm_mb`` (with gradient) and ``perm_bb``
   (detached); the backbone's mask becomes the constant ``lam_bb`` when
   ``lam_bb <= lam_margin`` or ``1 - lam_bb <= lam_margin``;
4. ``x_mb = x * m_mb[:, 0] + x[perm_mb] * m_mb[:, 1]`` and the same for ``bb``;
5. the losses: the momentum model on ``x_mb`` against ``lam_mb`` mixed targets
   (its weights frozen: trains the MixBlock only), the model's features of the
   clean batch through ``head_one`` against ``y`` (openmixup's ``head_one_q``), the model on ``x_bb`` against
   ``lam_bb`` mixed targets (returned as ``logits``/``target``), and
   ``mask_loss * max(|1 - mean(m_mb[:, 1]) - lam_mb| - margin, 0)``;
6. after the optimizer step (``after_step``): ``k = m * k + (1 - m) * q`` over
   the parameters (not the buffers), with the cosine momentum schedule.

Deviations from openmixup (also in the README):

- Two classifiers, as openmixup's ``head_one_q`` (clean batch) and ``head_mix_q``
  (mixed batch): the model's own classifier is ``head_mix_q``; the method owns
  ``head_one`` (a copy of the model's ``get_classifier()`` module, re-initialised
  N(0, 0.01)), swapped in for the clean pass by a forward hook on the model's
  classifier. The momentum model is a copy of the whole model (``backbone_k`` +
  ``head_mix_k``; openmixup's ``head_one_k`` serves only its test reports). One
  shared classifier for both losses gets twice the gradient and diverged on the
  digits benchmark at lr 0.1, as vanilla does at lr 0.2.
- The momentum model's feature pass stops at stage ``mask_layer`` (openmixup runs
  the whole backbone and keeps the stage's output): the same feature, less work;
  only the running batch-norm statistics of the momentum model's later stages
  differ, which nothing reads (the momentum model is never evaluated here).
- The mask's upsampling is to the input's size (openmixup: ``scale_factor =
  2**mask_layer`` at <= 64 px, ``2**(2 + mask_layer)`` above, i.e. its own
  backbones' strides); an integer ratio uses ``scale_factor`` as openmixup does.
- One upsampling mode (openmixup may draw one per call from a list); the "L1"
  mask loss only (the CIFAR setting); no NaN fallbacks (a non-finite loss fails
  the run in the harness); the MixBlock's attention and mask are computed in
  float32 under autocast (openmixup's ``force_fp32``/``.type(torch.float32)``).
- The LR schedule is the run's (openmixup's CIFAR config anneals to
  ``min_lr=0.05``); ``mix_block_lr``/``mix_block_momentum`` give the block its
  own lr and SGD momentum (openmixup's ``paramwise_options``, e.g. its WRN config).
- The MixBlock's initial weights come from the method's seeded generator
  (openmixup: torch's global RNG), so binding does not shift the run's other
  draws; the whole method (the model's two passes too) runs eagerly when the model is compiled.

Cost: five network passes per step (the momentum model's partial feature pass,
its forward and input-only backward, the model's forward and backward on the
clean and on the mixed batch): 2.96x vanilla's CPU step time for
PreActResNet-18 at 32 px, batch 100 (README, "AutoMix").
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mixbench import UsageError
from mixbench.hooks import stage_names, unwrap

from ._registry import MixMethod, MixOutput, mix_targets, register_method

UPSAMPLING = ("nearest", "bilinear", "bicubic")


class PixelMixBlock(nn.Module):
    """openmixup's ``PixelMixBlock`` in AutoMix's configuration: a 1x1 convolution ``value``
    (C -> 1) and a shared 1x1 convolution ``query`` (C -> C // reduction) for both query and key."""

    def __init__(self, in_channels: int, reduction: int = 2, use_scale: bool = True):
        super().__init__()
        self.inter_channels = max(in_channels // reduction, 1)
        self.use_scale = use_scale
        self.value = nn.Conv2d(in_channels, 1, kernel_size=1)
        self.query = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None, std: float = 0.01) -> None:
        """openmixup's ``init_weights(init_linear='normal')``: weights ~ N(0, std), biases 0."""
        for conv in (self.value, self.query):
            w = torch.randn(conv.weight.shape, generator=generator) * std
            conv.weight.copy_(w)
            conv.bias.zero_()

    def forward(self, feature: torch.Tensor, perm: torch.Tensor, size: Tuple[int, int],
                mode: str = "nearest") -> torch.Tensor:
        """The mask (N, 2, H, W) for mixing each sample with ``perm``'s partner: channel 0 the
        sample's own share, channel 1 the partner's (``sigmoid(P v)`` upsampled to ``size``)."""
        n, _, h, w = feature.shape
        partner = feature[perm]
        v = self.value(partner).reshape(n, 1, -1).permute(0, 2, 1)             # [N, HW, 1]
        q = self.query(feature).reshape(n, self.inter_channels, -1).permute(0, 2, 1)  # [N, HW, C']
        k = self.query(partner).reshape(n, self.inter_channels, -1)              # [N, C', HW]
        with torch.autocast(feature.device.type, enabled=False):
            pairwise = torch.matmul(q.float(), k.float())
            if self.use_scale:
                pairwise = pairwise / q.shape[-1] ** 0.5
            pairwise = pairwise.softmax(dim=-1)
            m = torch.matmul(pairwise, v.float()).view(n, 1, h, w)
            big_h, big_w = size
            if big_h % h == 0 and big_w % w == 0 and big_h // h == big_w // w:
                m = F.interpolate(m, scale_factor=big_h // h, mode=mode)
            else:
                m = F.interpolate(m, size=size, mode=mode)
            m = torch.sigmoid(m)
        return torch.cat([1 - m, m], dim=1)


def mask_l1_loss(mask: torch.Tensor, lam: float, margin: float) -> torch.Tensor:
    """openmixup's ``PixelMixBlock.mask_loss`` "L1": ``max(|1 - mean(partner share) - lam| - margin, 0)``."""
    n, _, h, w = mask.shape
    m_mean = mask[:, 1:2].sum() / (n * h * w)
    return torch.clamp(torch.abs(1 - m_mean - lam) - margin, min=0.0).mean()


def adjust_mask(mask: torch.Tensor, lam: float, eps: float = 1e-8) -> torch.Tensor:
    """openmixup's ``mask_adjust``: rescale each sample's own share so that its mean is ``lam``
    (``lam`` is openmixup's ``lam[0]``, the MixBlock's lambda). Returns a new mask."""
    mask = mask.clone()
    own = mask[:, 0].clamp(min=eps, max=1 - eps)
    mean = own.mean(dim=(1, 2))
    larger, smaller = mean > lam + eps, mean < lam - eps
    mask[larger, 0] = own[larger] * (lam / mean[larger].view(-1, 1, 1))
    mask[larger, 1] = 1 - mask[larger, 0]
    mask[smaller, 1] = (1 - own[smaller]) * ((1 - lam) / (1 - mean[smaller].view(-1, 1, 1)))
    mask[smaller, 0] = 1 - mask[smaller, 1]
    return mask


def pixel_mix(x: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * mask[:, 0] + x[perm] * mask[:, 1]`` (openmixup's ``img_mix_mb``/``img_mix_bb``)."""
    return x * mask[:, 0].unsqueeze(1) + x[perm] * mask[:, 1].unsqueeze(1)


def momentum_at(step: int, total_steps: int, base: float, end: float, start: float) -> float:
    """openmixup's ``CosineScheduleHook`` (``warming_up="constant"``, ``adjust_scope=[start, 1]``):
    ``base`` before ``int(start * total_steps)``, then ``end - (end - base) * (cos(pi t / T) + 1) / 2``
    (its ``restart_step`` sets 0 at step 0 when the scope starts at 0)."""
    first = int(total_steps * start) if start > 0 else 0
    if step < first:
        return base
    if step == 0:
        return 0.0
    return end - (end - base) * (math.cos(math.pi * step / float(total_steps)) + 1) / 2


class _Stop(Exception):
    """Raised by the feature tap to end a forward pass once the wanted stage has run."""


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


@register_method
class AutoMix(MixMethod):
    name = "automix"

    def __init__(self, alpha: float = 2.0, momentum: float = 0.999, end_momentum: float = 0.999999,
                 momentum_start: float = 0.1, mask_layer: int = 2, mask_loss: float = 0.1,
                 mask_loss_margin: float = 0.1, mask_adjust: float = 0.0, lam_margin: float = 0.08,
                 reduction: int = 2, use_scale: bool = True, upsampling: str = "nearest",
                 one_hot_weight: float = 1.0, mix_block_lr: Optional[float] = None,
                 mix_block_momentum: Optional[float] = None):
        super().__init__()
        if not alpha > 0:
            raise UsageError(f"automix alpha must be > 0, got {alpha!r}")
        if not 0 <= momentum <= end_momentum <= 1:
            raise UsageError(f"automix needs 0 <= momentum <= end_momentum <= 1, got {momentum!r}, {end_momentum!r}")
        if not 0 <= momentum_start <= 1:
            raise UsageError(f"automix momentum_start must be in [0, 1], got {momentum_start!r}")
        if isinstance(mask_layer, bool) or not isinstance(mask_layer, int) or mask_layer < 0:
            raise UsageError(f"automix mask_layer must be a stage index >= 0, got {mask_layer!r}")
        if mask_loss < 0 or mask_loss_margin < 0 or one_hot_weight < 0:
            raise UsageError("automix mask_loss, mask_loss_margin and one_hot_weight must be >= 0")
        if not 0 <= mask_adjust <= 1 or not lam_margin < 1:
            raise UsageError(f"automix needs 0 <= mask_adjust <= 1 and lam_margin < 1, got {mask_adjust!r}, "
                             f"{lam_margin!r}")
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise UsageError(f"automix reduction must be an integer >= 1, got {reduction!r}")
        if upsampling not in UPSAMPLING:
            raise UsageError(f"automix upsampling must be one of {', '.join(UPSAMPLING)}, got {upsampling!r}")
        self.alpha = alpha
        self.momentum = momentum
        self.end_momentum = end_momentum
        self.momentum_start = momentum_start
        self.mask_layer = mask_layer
        self.mask_loss = mask_loss
        self.mask_loss_margin = mask_loss_margin
        self.mask_adjust = mask_adjust
        self.lam_margin = lam_margin
        self.reduction = reduction
        self.use_scale = use_scale
        self.upsampling = upsampling
        self.one_hot_weight = one_hot_weight
        self.mix_block_lr = mix_block_lr
        self.mix_block_momentum = mix_block_momentum
        self.mix_block: Optional[PixelMixBlock] = None
        self.momentum_model: Optional[nn.Module] = None
        self.head_one: Optional[nn.Module] = None
        self._tap: Dict[str, Any] = {}
        self._one: Dict[str, Any] = {"armed": False}

    # -- the method's own modules ------------------------------------------------
    def bind(self, model: nn.Module) -> None:
        """The momentum copy of ``model`` (frozen: trained only by ``after_step``) and the MixBlock on
        the output of stage ``mask_layer``, initialised from the method's seed (not torch's RNG)."""
        self._check_setup()
        net = unwrap(model)
        names = stage_names(net)  # [stem, stage 0, stage 1, ...] (timm's feature_info)
        if self.mask_layer + 1 >= len(names):
            raise UsageError(f"automix mask_layer={self.mask_layer}: {type(net).__name__} has stages "
                             f"0..{len(names) - 2}")
        k = copy.deepcopy(net)
        for p in k.parameters():
            p.requires_grad_(False)
        module = k.get_submodule(names[self.mask_layer + 1])
        channels = net.feature_info[self.mask_layer + 1]["num_chs"]
        param = next(net.parameters())
        block = PixelMixBlock(channels, self.reduction, self.use_scale)
        g = torch.Generator().manual_seed(int(self.rng.integers(2**63)))
        block.reset_parameters(generator=g)
        self.mix_block = block.to(param.device)
        self.momentum_model = k
        self._tap = {"armed": False, "out": None}
        module.register_forward_hook(self._tap_hook)
        # openmixup's head_one_q: the clean batch's own classifier (the model's is head_mix_q). Registered
        # on the model after the momentum copy was taken, so that the copy has no such hook.
        fc = net.get_classifier() if hasattr(net, "get_classifier") else None
        if not isinstance(fc, (nn.Linear, nn.Conv2d)) or fc.bias is None:
            raise UsageError(f"automix needs a timm model whose get_classifier() is an nn.Linear (or a 1x1 "
                             f"nn.Conv2d) with a bias, got {type(fc).__name__} for {type(net).__name__}")
        head = copy.deepcopy(fc)
        with torch.no_grad():  # openmixup's ClsHead.init_weights(init_linear='normal', std=0.01, bias=0)
            head.weight.copy_(torch.randn(head.weight.shape, generator=g).to(head.weight) * 0.01)
            head.bias.zero_()
        head._forward_hooks.clear()
        self.head_one = head
        self._one = {"armed": False}
        fc.register_forward_hook(self._head_one_hook)

    def _head_one_hook(self, module, inputs, output):
        if self._one["armed"]:
            self._one["fired"] = True
            return self.head_one(inputs[0])
        return None

    def _tap_hook(self, module, inputs, output):
        if self._tap["armed"]:
            self._tap["out"] = output
            raise _Stop()

    def stage_feature(self, x: torch.Tensor) -> torch.Tensor:
        """The momentum model's output at stage ``mask_layer`` for ``x`` (its later stages not run)."""
        self._tap.update(armed=True, out=None)
        try:
            self.momentum_model(x)
        except _Stop:
            pass
        finally:
            self._tap["armed"] = False
        out, self._tap["out"] = self._tap["out"], None
        return out

    def clean_logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's features of ``x`` through ``head_one`` (openmixup's ``head_one_q``) instead of the
        model's classifier (``head_mix_q``): one forward pass of ``model`` with its classifier's output
        replaced."""
        self._one.update(armed=True, fired=False)
        try:
            logits = model(x)
        finally:
            self._one["armed"] = False
        if not self._one["fired"]:
            raise RuntimeError("automix: the model's classifier did not run head_one; call the method with "
                               "the model it was bound to (bind(model))")
        return logits

    def owned_modules(self) -> Dict[str, nn.Module]:
        if self.mix_block is None:
            return {}
        return {"mix_block": self.mix_block, "momentum_model": self.momentum_model, "head_one": self.head_one}

    def param_groups(self) -> List[Dict[str, Any]]:
        self._check_bound()
        group: Dict[str, Any] = {"params": list(self.mix_block.parameters())}
        if self.mix_block_lr is not None:
            group["lr"] = self.mix_block_lr
        if self.mix_block_momentum is not None:
            group["momentum"] = self.mix_block_momentum
        # head_one_q trains with the run's options, as the model's own parameters (openmixup: one group).
        return [group, {"params": list(self.head_one.parameters())}]

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """openmixup's ``momentum_update`` with the momentum of ``CosineScheduleHook`` at ``step``."""
        self._check_bound()
        m = momentum_at(step, total_steps, self.momentum, self.end_momentum, self.momentum_start)
        if m >= 1.0:
            return
        for q, k in zip(unwrap(model).parameters(), self.momentum_model.parameters()):
            k.copy_(k * m + q.detach() * (1.0 - m))

    def _check_bound(self) -> None:
        if self.mix_block is None:
            raise RuntimeError("automix: call bind(model) after setup (the harness does) before training")

    # -- one step ---------------------------------------------------------------
    def draw(self, n: int) -> Tuple[float, float, Any, Any, bool]:
        """lam_mb, lam_bb, perm_bb, perm_mb, and whether the mask is adjusted, in openmixup's order."""
        lam_mb, lam_bb = (float(v) for v in self.rng.beta(self.alpha, self.alpha, 2))
        perm_bb = self.rng.permutation(n)
        perm_mb = self.rng.permutation(n)
        adjust = bool(self.mask_adjust > self.rng.random()) if self.mask_adjust > 0 else False
        return lam_mb, lam_bb, perm_bb, perm_mb, adjust

    def mix(self, x: torch.Tensor, feature: torch.Tensor, lam_mb: float, lam_bb: float, perm_mb: torch.Tensor,
            perm_bb: torch.Tensor, adjust: bool = False) -> Dict[str, torch.Tensor]:
        """openmixup's ``pixel_mixup``: the two mixed batches and the (weighted) mask loss."""
        size = tuple(x.shape[-2:])
        mask_mb = self.mix_block(feature, perm_mb, size, self.upsampling)
        with torch.no_grad():
            mask_bb = self.mix_block(feature, perm_bb, size, self.upsampling)
        if adjust:
            mask_bb = adjust_mask(mask_bb, lam_mb)
        if self.lam_margin >= lam_bb or self.lam_margin >= 1 - lam_bb:
            mask_bb = torch.stack([torch.full_like(mask_bb[:, 0], lam_bb),
                                   torch.full_like(mask_bb[:, 1], 1 - lam_bb)], dim=1)
        out = {"mask_mb": mask_mb, "mask_bb": mask_bb,
               "x_mb": pixel_mix(x, perm_mb, mask_mb), "x_bb": pixel_mix(x, perm_bb, mask_bb)}
        if self.mask_loss > 0:
            out["mask_loss"] = self.mask_loss * mask_l1_loss(mask_mb, lam_mb, self.mask_loss_margin)
        return out

    def forward(self, model, x, y):
        self._check_bound()
        # Under torch.compile both of the model's passes run its eager module (torch.compile's wrapper
        # keeps it as ``_orig_mod``; the data-parallel wrapper, which also has one, is kept so that the
        # gradients stay synchronised): a compiled graph does not see the flag of the clean pass's
        # classifier hook, and an eager pass next to a compiled one in the same step fails the backward
        # (the compiled graph's batch-norm buffer updates bump their versions).
        if getattr(model, "compiled_wrapper", False) or isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        n = x.shape[0]
        lam_mb, lam_bb, perm_bb, perm_mb, adjust = self.draw(n)
        perm_bb = torch.from_numpy(perm_bb).to(x.device, non_blocking=True)
        perm_mb = torch.from_numpy(perm_mb).to(x.device, non_blocking=True)
        k = self.momentum_model
        k.train(unwrap(model).training)  # the eager module's mode: the harness sets that one, not a wrapper's
        with torch.no_grad():
            feature = self.stage_feature(x)
        mixed = self.mix(x, feature, lam_mb, lam_bb, perm_mb, perm_bb, adjust)
        # The MixBlock's loss: the frozen momentum model on its mixed batch (openmixup's forward_k).
        extra = _soft_ce(k(mixed["x_mb"]), mix_targets(y, perm_mb, lam_mb))
        if "mask_loss" in mixed:
            extra = extra + mixed["mask_loss"]
        # The encoder: the clean batch (head_one_q), then its mixed batch (head_mix_q), as forward_q.
        if self.one_hot_weight > 0:
            extra = extra + self.one_hot_weight * _soft_ce(self.clean_logits(model, x), y)
        logits = model(mixed["x_bb"])
        return MixOutput(logits, mix_targets(y, perm_bb, lam_bb), extra)
