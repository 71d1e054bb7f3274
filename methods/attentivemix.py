"""Attentive CutMix (Walawalkar, Shen, Liu, Savvides, ICASSP 2020, arXiv 2003.13048).

A pretrained feature extractor looks at each image; the cells of its last
feature map with the highest mean activation are the image's attentive regions.
Each sample keeps its own top-k attentive cells (upsampled to pixels) and takes
the rest of the image from its partner; the labels follow the realised areas.

Reference code: the ``attentivemix`` augment of Westlake-AI/openmixup
(``openmixup/models/augments/attentivemix.py`` and the feature pass in
``models/classifiers/mixup_classification.py``), whose CIFAR configuration
(``configs/classification/cifar*/mixups/basic/r18_attentivemix_CE_none.py``)
is the default here: an ImageNet-pretrained ResNet-18 extractor on the batch
upsampled to 224 px (a 7 x 7 grid), ``alpha=2`` and ``top_k=None``, openmixup's
"AttentiveMix+": ``top_k = min(max(1, int(cells * lam)), cells)`` with
``lam ~ Beta(alpha, alpha)``. ``top_k=6`` gives the paper's fixed six cells.
The mask and the mixed images are openmixup's bit for bit
(``tests/test_attentivemix.py`` checks it against a local copy).

The extractor. ``extractor`` is the path of a checkpoint of the timm model
``extractor_model`` (built with ``extractor_kwargs``; mixbench's aliases work):
a ``state_dict``, or a dict holding it under ``state_dict``, ``model`` or
``model_state_dict`` (a mixbench ``model.pt`` or a torchvision ResNet's
weights, whose names are timm's). Classifier weights are ignored; every other
weight of the model must be in the file. Without ``extractor`` the path comes
from ``$MIXBENCH_ATTENTIVEMIX_EXTRACTOR``; with neither, the method is
unavailable (``--methods all`` skips it with a one-line note). Files are read
with ``torch.load(weights_only=True)``.

Deviations, also in the README:

- Label weights are each sample's own realised area. openmixup uses the area of
  the first sample's mask for the whole batch, which differs from the others'
  when the grid does not divide the image (7 cells on 32 px: cells of 4 or 5 px).
- The extractor runs in eval mode, in float32, without gradient. In openmixup it
  stays in train mode (its batch norms use batch statistics and keep updating
  their running averages), which the paper's frozen pretrained model does not do.
- The input of the extractor is resized to exactly ``feat_size`` (bilinear,
  the other side in proportion); openmixup passes a scale factor, which gives
  the same size when ``feat_size / H`` is exact. A one-channel batch is
  repeated to the extractor's input channels.
- ``lam`` is drawn only when ``top_k`` is None (openmixup always draws it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mixbench import UsageError

from ._registry import MixMethod, MixOutput, register_method

ENV = "MIXBENCH_ATTENTIVEMIX_EXTRACTOR"


def attentive_mask(features: torch.Tensor, top_k: int, size: Tuple[int, int]) -> torch.Tensor:
    """(N, 1, H, W) float32 mask: 1 on the ``top_k`` cells of highest channel-mean activation.

    ``features`` (N, C, h, w) from the extractor; cells are chosen by ``torch.topk``
    (openmixup's choice, ties included) and upsampled by nearest neighbour.
    """
    n, _, h, w = features.shape
    k = min(max(int(top_k), 1), h * w)
    _, idx = features.float().mean(1).reshape(n, h * w).topk(k)
    mask = torch.zeros(n, h * w, device=features.device).scatter_(1, idx, 1.0)
    return F.interpolate(mask.view(n, 1, h, w), size=tuple(size), mode="nearest")


def attentivemix(x: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``mask * x + (1 - mask) * x[perm]``; returns the mixed batch and each sample's own area (N,)."""
    own = mask.mean((1, 2, 3))
    mask = mask.to(x.dtype)
    return mask * x + (1 - mask) * x[perm], own


def top_k_from_lambda(lam: float, cells: int) -> int:
    """openmixup's AttentiveMix+ rule: ``min(max(1, int(cells * lam)), cells)``."""
    return min(max(1, int(cells * lam)), cells)


def configured_extractor(extractor: Optional[str] = None) -> Optional[str]:
    """The extractor path: the parameter, else ``$MIXBENCH_ATTENTIVEMIX_EXTRACTOR``, else None."""
    path = extractor if extractor else os.environ.get(ENV) or None
    return os.path.expanduser(str(path)) if path else None


def _state_dict_of(obj: Any, path: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UsageError(f"attentivemix extractor {path}: expected a state_dict (or a dict holding one under "
                         "'state_dict', 'model' or 'model_state_dict')")
    prefix = "module."
    if all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def load_extractor(path: str, model_name: str, feat_size: int, kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The frozen extractor: ``model_name`` without its classifier, weights from ``path``, eval mode."""
    from mixbench.models import create_model

    if not Path(path).is_file():
        raise UsageError(f"attentivemix extractor {path!r} is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle of objects, a truncated file...
        raise UsageError(f"attentivemix extractor {path}: cannot read it as a weights-only torch file "
                         f"({exc})") from None
    state = _state_dict_of(obj, path)
    model = create_model(model_name, num_classes=1000, image_size=feat_size, **dict(kwargs or {}))
    model.reset_classifier(0)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise UsageError(f"attentivemix extractor {path} does not fit {model_name!r}: {exc}") from None
    if result.missing_keys:
        missing = ", ".join(result.missing_keys[:5]) + (" ..." if len(result.missing_keys) > 5 else "")
        raise UsageError(f"attentivemix extractor {path} lacks {len(result.missing_keys)} weight(s) of "
                         f"{model_name!r}: {missing}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _in_channels(model: nn.Module) -> Optional[int]:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else None


@register_method
class AttentiveMix(MixMethod):
    """Attentive CutMix with a frozen pretrained extractor (see the module docstring).

    Per batch, from the method's generator, in this order: lambda ~ Beta(alpha, alpha)
    (only when ``top_k`` is None), then the permutation.
    """

    name = "attentivemix"

    def __init__(
        self,
        alpha: float = 2.0,
        top_k: Optional[int] = None,
        extractor: Optional[str] = None,
        extractor_model: str = "resnet18",
        extractor_kwargs: Optional[Dict[str, Any]] = None,
        feat_size: int = 224,
    ):
        super().__init__()
        path = configured_extractor(extractor)
        if path is None:
            raise UsageError(self.unavailable_reason())
        if top_k is not None and (int(top_k) != top_k or top_k < 1):
            raise UsageError(f"attentivemix top_k must be None or a positive integer, got {top_k!r}")
        if int(feat_size) != feat_size or feat_size < 1:
            raise UsageError(f"attentivemix feat_size must be a positive integer, got {feat_size!r}")
        self.alpha = alpha
        self.top_k = None if top_k is None else int(top_k)
        self.extractor = path
        self.extractor_model = extractor_model
        self.extractor_kwargs = dict(extractor_kwargs) if extractor_kwargs else None
        self.feat_size = int(feat_size)
        self._net: Optional[nn.Module] = None
        self._net_on: Dict[Any, nn.Module] = {}

    # -- availability: an extractor must be configured -------------------
    @classmethod
    def default_params(cls) -> Dict[str, Any]:
        params = super().default_params()
        params["extractor"] = configured_extractor()  # recorded in the run's parameters
        return params

    @classmethod
    def available(cls, **params: Any) -> bool:
        path = configured_extractor(params.get("extractor"))
        return path is not None and Path(path).is_file()

    @classmethod
    def unavailable_reason(cls, **params: Any) -> str:
        path = configured_extractor(params.get("extractor"))
        if path is not None and not Path(path).is_file():
            return f"attentivemix: the extractor checkpoint {path} is not a file"
        return (f"attentivemix needs a pretrained feature extractor: set ${ENV} to a checkpoint of the timm "
                "model `extractor_model` (default resnet18, e.g. torchvision's ImageNet ResNet-18 weights), "
                "or pass extractor=PATH")

    # -- the run -----------------------------------------------------------
    def setup(self, **kwargs) -> None:
        super().setup(**kwargs)
        self._net = load_extractor(self.extractor, self.extractor_model, self.feat_size, self.extractor_kwargs)
        self._net_on = {}

    def extractor_net(self, device) -> nn.Module:
        """The frozen extractor on ``device`` (copied there once)."""
        self._check_setup()
        key = torch.device(device)
        if key not in self._net_on:
            self._net_on[key] = self._net if key.type == "cpu" else self._net.to(key)
        return self._net_on[key]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The extractor's last feature map of the batch resized to ``feat_size`` (float32, no gradient)."""
        net = self.extractor_net(x.device)
        height, width = x.shape[-2:]
        size = (self.feat_size, max(1, round(width * self.feat_size / height)))
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            inp = x.detach().float()
            chans = _in_channels(net)
            if chans is not None and inp.shape[1] != chans:
                if inp.shape[1] != 1:
                    raise UsageError(f"attentivemix: the extractor takes {chans} input channels, the data has "
                                     f"{inp.shape[1]}")
                inp = inp.expand(-1, chans, -1, -1)
            if (height, width) != size:
                inp = F.interpolate(inp, size=size, mode="bilinear")
            return net.forward_features(inp).float()

    def forward(self, model, x, y):
        feats = self.features(x)
        cells = feats.shape[-2] * feats.shape[-1]
        top_k = self.top_k if self.top_k is not None else top_k_from_lambda(self.draw_lambda(self.alpha), cells)
        perm = self.draw_perm(x.shape[0], x.device)
        mask = attentive_mask(feats, top_k, x.shape[-2:])
        mixed, own = attentivemix(x, perm, mask)
        own = own.to(y.dtype)[:, None]
        return MixOutput(model(mixed), own * y + (1 - own) * y[perm])
