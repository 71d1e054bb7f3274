"""snu-mllab/Co-Mixup's mixing code loaded from a checkout, and its random draws: shared by
tests/test_comixup.py (equality) and benchmarks/comixup_speed.py (speed)."""
import importlib.util
import os
import sys

import numpy as np
import torch


def load_comixup(root, monkeypatch=None):
    """The reference's ``mixup`` module (``mixup.py``, with ``match.py`` as the ``match`` it imports), its
    hard-coded ``device='cuda'`` replaced by the CPU. ``match`` goes into ``sys.modules`` through
    ``monkeypatch`` when given (undone after the test), else for good."""
    spec = importlib.util.spec_from_file_location("match", os.path.join(root, "match.py"))
    match = importlib.util.module_from_spec(spec)
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, "match", match)  # mixup.py does `from match import ...`
    else:
        sys.modules["match"] = match
    spec.loader.exec_module(match)
    spec = importlib.util.spec_from_file_location("comixup_reference_mixup", os.path.join(root, "mixup.py"))
    mixup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mixup)
    solve = match.get_onehot_matrix
    mixup.get_onehot_matrix = lambda *a, **k: solve(*a, **{**k, "device": "cpu"})
    return mixup


def reference_draws(seed, n, part, block_num, alpha):
    """The reference's random draws in its order (per partition a torch Dirichlet, then numpy's initial
    labels), for mixbench's ``co_mixup``; reseeds both generators so that the reference draws them again."""
    from mixbench.methods import comixup as cm

    torch.manual_seed(seed)
    np.random.seed(seed)
    priors, inits = [], []
    for a, b in cm.partition_bounds(n, part):
        priors.append(torch.distributions.dirichlet.Dirichlet(alpha * torch.ones(b - a)).sample().numpy())
        inits.append(np.random.randint(0, b - a, (b - a, block_num, block_num)))
    torch.manual_seed(seed)
    np.random.seed(seed)
    return priors, inits
