"""Small fixtures shared by the per-method tests: a seeded batch with a linear model, the check that
two instances set up with one seed mix identically, and the harness's training step on a tiny
PreActResNet (:class:`Trainer`)."""
import torch
import torch.nn.functional as F

from mixbench.losses import get_loss
from mixbench.methods import create_method
from mixbench.models import create_model
from mixbench.train import step_loss


def linear_batch(n: int, side: int = 16, classes: int = 5):
    """``n`` random 3-channel images (seeded by ``n``), one-hot targets and a seeded linear model."""
    x = torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(n))
    y = F.one_hot(torch.arange(n) % classes, classes).float()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * side * side, classes))
    return x, y, model


def assert_same_seed_same_mix(name: str, model, x, y, seed: int = 2, **params) -> None:
    a, b = create_method(name, **params), create_method(name, **params)
    for m in (a, b):
        m.setup(seed=seed, num_classes=y.shape[1], mean=(0.5,) * 3, std=(0.25,) * 3)
    with torch.no_grad():
        oa, ob = a(model, x, y), b(model, x, y)
    assert torch.equal(oa.logits, ob.logits) and torch.equal(oa.target, ob.target)


CLASSES, BATCH, SIDE = 5, 8, 16
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def tiny_model():
    torch.manual_seed(0)
    return create_model("resnetv2_18", num_classes=CLASSES, image_size=SIDE, layers=(1, 1, 1, 1),
                        channels=(8, 16, 16, 16), stem_chs=8)


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, SIDE, SIDE, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g))
            for _ in range(n)]


def params_of(name):
    return {"workers": 0} if name == "puzzlemix" else {}


def method_params(name, tmp_path):
    """:func:`params_of`, and for AttentiveMix a tiny extractor written into ``tmp_path`` (its pretrained
    extractor is a parameter)."""
    if name == "attentivemix":
        from test_attentivemix import write_extractor
        return write_extractor(tmp_path)
    return params_of(name)


class Trainer:
    """One model, one method, SGD: the harness's step (``step_loss``, the same order of calls)."""

    def __init__(self, name, forward, model, params=None):
        self.forward, self.model = forward, model
        self.method = create_method(name, **(params_of(name) if params is None else params))
        self.method.setup(seed=3, num_classes=CLASSES, mean=MEAN, std=STD)
        self.criterion = get_loss("ce")
        self.method.bind(model)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                         weight_decay=5e-4)
        for group in self.method.param_groups():
            self.optimizer.add_param_group(group)
        self.steps = 0

    def step(self, x, y):
        self.model.train()
        loss = step_loss(self.method, self.forward, x, F.one_hot(y, CLASSES).float(), self.criterion,
                         self.criterion.extra_weight(CLASSES))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.method.after_step(self.model, self.steps, 100)
        self.steps += 1
        return loss.detach()
