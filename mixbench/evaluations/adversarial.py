"""``adversarial``: FGSM and L-inf PGD with a random start (untargeted, cross-entropy) [eps, pgd_steps,
pgd_step_size]."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

from mixbench import UsageError
from mixbench.evaluations._registry import Headline, register_suite
from mixbench.evaluations.base import EvalContext, generator


def _input_grad(model: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x).float(), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: Callable, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Goodfellow et al. 2015: ``clamp(x + eps * sign(grad_x CE(model(x), y)), 0, 1)``."""
    return (x + eps * _input_grad(model, x, y).sign()).clamp(0, 1).detach()


def pgd(
    model: Callable, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Madry et al. 2018: a uniform random start in the eps-ball, then ``steps`` signed-gradient steps,
    each projected back onto the eps-ball and [0, 1]. ``generator=None``: no random start."""
    if generator is not None:
        start = (torch.rand(x.shape, generator=generator) * 2 - 1).to(x.device) * eps
        adv = (x + start).clamp(0, 1)
    else:
        adv = x.clone()
    for _ in range(steps):
        adv = adv + step_size * _input_grad(model, adv, y).sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1).detach()
    return adv


def _check(o: Dict[str, Any]) -> None:
    if o["eps"] < 0 or o["pgd_steps"] < 0 or o["pgd_step_size"] < 0:
        raise UsageError("adversarial eps, pgd_steps and pgd_step_size must be >= 0")


@register_suite(headlines=[Headline("fgsm_top1", percent=True), Headline("pgd_top1", percent=True)], check=_check)
def suite_adversarial(ctx: EvalContext, eps: float = 8 / 255, pgd_steps: int = 10,
                      pgd_step_size: float = 2 / 255) -> Dict[str, Any]:
    clean = fgsm_hits = pgd_hits = 0
    g = generator(ctx.seed, "pgd")
    for x, y in ctx.test_batches():
        x_fgsm = fgsm(ctx.model, x, y, eps)
        x_pgd = pgd(ctx.model, x, y, eps, pgd_step_size, pgd_steps, g)
        with torch.no_grad():
            clean += (ctx.model(x).argmax(1) == y).sum().item()
            fgsm_hits += (ctx.model(x_fgsm).argmax(1) == y).sum().item()
            pgd_hits += (ctx.model(x_pgd).argmax(1) == y).sum().item()
    n = len(ctx.test)
    return {"clean_top1": 100.0 * clean / n, "fgsm_top1": 100.0 * fgsm_hits / n, "pgd_top1": 100.0 * pgd_hits / n,
            "eps": eps, "pgd_steps": pgd_steps, "pgd_step_size": pgd_step_size}
