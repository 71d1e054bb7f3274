"""Under bf16 autocast every method decides in float32: the same targets and the same model inputs
(mixed batches) as without autocast.

On CUDA, runs train under bf16 autocast. The saliency, CAM, extractor and mask passes that decide how
images are mixed, and the solvers after them, are computed in float32 (as the authors' code computes
them), so a method mixes the same images with the same label weights whether or not autocast is on;
only the network's own activations and logits are bf16. CPU autocast shows this without a GPU.
Hidden-point methods mix activations, which are bf16 under autocast by design; their draws, targets
and inputs are still checked. AutoMix's mask is the output of its trained MixBlock on the momentum
model's feature maps, network activations like any other (openmixup trains it under fp16 too): its
mixed batch agrees closely, not exactly.

The model's state is restored before each batch: training-mode batch norms update their running
statistics from bf16 activations under autocast, which would change the next batch's eval-mode
saliency for a reason that is not the method's.
"""
import pytest
import torch
import torch.nn.functional as F

from method_checks import CLASSES, MEAN, STD, batches, method_params, tiny_model
from mixbench.methods import create_method, list_methods


LEARNED_MASKS = {"automix"}  # a trained module's output decides the mix (see the module docstring)




def mix(name, params, autocast):
    """Targets and every input the model was called with, over 6 batches, with autocast on or off."""
    model = tiny_model()
    model.train()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = []
    model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().float().clone()))
    method = create_method(name, **params)
    method.setup(seed=3, num_classes=CLASSES, mean=MEAN, std=STD)
    method.bind(model)
    targets = []
    for x, y in ((x, F.one_hot(y, CLASSES).float()) for x, y in batches(6)):
        model.load_state_dict(start)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = method(model, x, y)
        assert torch.isfinite(out.logits.float()).all()
        targets.append(out.target.float())
    method.close()
    return torch.stack(targets), inputs


@pytest.mark.parametrize("name", list_methods())
def test_every_method_mixes_the_same_under_bf16_autocast(name, tmp_path):
    params = method_params(name, tmp_path)
    targets, inputs = mix(name, params, autocast=False)
    targets_bf16, inputs_bf16 = mix(name, params, autocast=True)
    assert torch.equal(targets, targets_bf16), (targets - targets_bf16).abs().max()
    assert len(inputs) == len(inputs_bf16)
    for i, (a, b) in enumerate(zip(inputs, inputs_bf16)):
        if name in LEARNED_MASKS:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-2)
        else:
            assert torch.equal(a, b), f"{name}: model input {i} differs by {(a - b).abs().max():.3g} under autocast"
