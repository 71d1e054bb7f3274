"""Every method trained under torch.compile with the real mixing hooks equals eager training, and once each
mixing point has its graph no step compiles again (hidden-point mixing stays inside the compiled graphs).

Compiling is slow on a small CPU, so these tests are marked slow. The main test uses dynamo with AOT
autograd and eager kernels (``aot_eager``): the same tracing, guards, graph breaks and recompiles as
inductor; one test runs inductor itself.
"""
import pytest
import torch

import mixbench.hooks as hooks
from mixbench.hooks import install_mixing_hooks, mixing_state, resolve_points
from mixbench.methods import create_method, get_method, list_methods
from mixbench.compiled import compile_model
from method_checks import SIDE, Trainer, batches, params_of, tiny_model

pytestmark = pytest.mark.slow

def counting_backend(name, log):
    from torch._dynamo.backends.registry import lookup_backend

    inner = lookup_backend(name)

    def backend(gm, example_inputs):
        log.append(len(gm.graph.nodes))
        return inner(gm, example_inputs)

    return backend


def method_points(name, model):
    """The graphs a method's steps need: -1 for a plain forward (input-level mixing), k for hidden point k."""
    mix_points = create_method(name, **params_of(name)).params().get("mix_points")
    if mix_points is None:
        return {-1}
    return {-1 if k == 0 else k for k in resolve_points(model, mix_points)}


def compare(name, backend, monkeypatch, max_steps=40, equal_steps=3, gpu_layout=False):
    """Train ``name`` eager and compiled side by side; ``gpu_layout``: as a CUDA run does, under bf16
    autocast (here the CPU's) with the models and batches in channels_last."""
    torch._dynamo.reset()
    compiles, armed_points = [], []
    real_armed = hooks.armed

    def recording_armed(state, k, fn):
        armed_points.append(k)
        return real_armed(state, k, fn)

    monkeypatch.setattr(hooks, "armed", recording_armed)
    eager_model, compiled_model = tiny_model(), tiny_model()
    layout = torch.channels_last if gpu_layout else torch.contiguous_format
    eager_model, compiled_model = (m.to(memory_format=layout) for m in (eager_model, compiled_model))
    forward = compile_model(compiled_model, backend=counting_backend(backend, compiles), memory_format=layout)
    assert mixing_state(forward) is not None
    eager, compiled = Trainer(name, eager_model, eager_model), Trainer(name, forward, compiled_model)
    wanted = method_points(name, compiled_model)
    seen, per_step = set(), []
    data = batches(max_steps)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=gpu_layout)
    tol = 1e-2 if gpu_layout else 1e-4  # bf16 rounds to 3 significant digits; fused graphs round elsewhere
    for i, (x, y) in enumerate(data):
        x = x.contiguous(memory_format=layout)
        with autocast:
            loss_e = eager.step(x, y)
        before, armed_points[:] = len(compiles), []
        with autocast:
            loss_c = compiled.step(x, y)
        point = armed_points[0] if armed_points else -1
        new = len(compiles) - before
        per_step.append((point, new))
        if point in seen:
            assert new == 0, f"{name}: step {i} at point {point} compiled again ({per_step})"
        seen.add(point)
        if i < equal_steps:
            torch.testing.assert_close(loss_c, loss_e, rtol=tol, atol=tol)
        if i + 1 == equal_steps:
            for (n, pe), pc in zip(eager_model.named_parameters(), compiled_model.parameters()):
                torch.testing.assert_close(pc, pe, rtol=tol, atol=tol, msg=lambda m: f"{name}: {n} after {i + 1} steps\n{m}")
        if i + 1 >= equal_steps and wanted <= seen and len(per_step) > len(seen):
            break  # every point has its graph, and at least one step reused one
    assert wanted <= seen, f"{name}: points {wanted - seen} never drawn in {len(per_step)} steps"
    # A fixed set of graphs: one per mixing point (plus the saliency pass of saliency-based methods).
    assert len(compiles) <= len(seen) + 1, (name, per_step)
    eager.method.close()
    compiled.method.close()
    return per_step, compiles


@pytest.mark.parametrize("name", [m for m in list_methods() if get_method(m).available()])
def test_every_method_compiled_equals_eager_without_recompiles(name, monkeypatch):
    per_step, compiles = compare(name, "aot_eager", monkeypatch)
    if name in ("manifold_mixup", "catchup_mix", "alignmix"):
        assert any(p > 0 for p, _ in per_step), "hidden points were mixed"


@pytest.mark.parametrize("name", ["manifold_mixup", "catchup_mix", "alignmix", "puzzlemix", "automix"])
def test_hidden_point_and_saliency_methods_compiled_under_bf16_autocast_in_channels_last(name, monkeypatch):
    """The CUDA defaults together (compile, bf16 autocast, channels_last), on the CPU: the mixing hooks,
    the float32 saliency pass and AutoMix's passes inside autocast give eager's losses, no recompiles."""
    per_step, compiles = compare(name, "aot_eager", monkeypatch, gpu_layout=True)
    assert any(p > 0 for p, _ in per_step) or name in ("puzzlemix", "automix")


def test_inductor_mixes_hidden_points_inside_the_graph(monkeypatch):
    """The GPU path's compiler (on the CPU): hidden-point Manifold Mixup through the opaque mixing
    operator, no graph break, no recompile per step."""
    import torch._dynamo.utils as dynamo_utils

    dynamo_utils.counters.clear()
    per_step, compiles = compare("manifold_mixup", "inductor", monkeypatch, max_steps=12)
    assert any(p > 0 for p, _ in per_step)
    assert not dynamo_utils.counters["graph_break"], dict(dynamo_utils.counters["graph_break"])


def test_compiled_forward_mixed_equals_a_manual_forward():
    """forward_mixed on a compiled model with installed hooks calls the compiled model, mixing at point k."""
    torch._dynamo.reset()
    model = tiny_model().eval()
    install_mixing_hooks(model)
    compiled = torch.compile(model, backend="eager", dynamic=False)
    x = torch.randn(4, 3, SIDE, SIDE)
    plain = model(x)
    for k in (1, 2, 4):
        with torch.no_grad():
            got = hooks.forward_mixed(compiled, x, k, lambda h: h.flip(0) * 1.5)
            with hooks.replace_stage_output(model, k, lambda h: h.flip(0) * 1.5):
                want = model(x)
        torch.testing.assert_close(got, want)
        assert not torch.allclose(got, plain)
    with pytest.raises(RuntimeError, match="did not run"):
        with hooks.armed(mixing_state(model), 2, lambda h: h):
            pass


def test_train_run_compiled_matches_eager_and_resumes(tmp_path, monkeypatch):
    """The harness with compile on (dynamo + AOT autograd here, inductor on CUDA): the same training as
    eager to 1e-4, hidden-point mixing included, and an exact resume of a compiled run."""
    import json

    import mixbench.train as train
    from mixbench.spec import RunSpec
    from mixbench.train import train_run

    monkeypatch.setenv("MIXBENCH_COMPILE_BACKEND", "aot_eager")

    def spec(**kw):
        options = dict(method="manifold_mixup", dataset="synthetic", seed=2, epochs=2, batch_size=64,
                       train_subset=128, device="cpu", checkpoint_every_min=0, method_params={"mix_points": [2, 3]})
        return RunSpec.from_dict({**options, **kw}).resolved()

    eager = train_run(spec(), tmp_path / "eager", progress=False)
    compiled = train_run(spec(compile=True), tmp_path / "compiled", progress=False)
    assert compiled["compiled"] is True and eager["compiled"] is False
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("eager", "compiled")]
    for a, b in zip(*rows):
        for key in ("train_loss", "test_loss"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])
    we, wc = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("eager", "compiled"))
    for k in we:
        torch.testing.assert_close(wc[k], we[k], rtol=1e-4, atol=1e-4)

    class Stop(BaseException):
        pass

    real = train.save_checkpoint

    def save_then_stop(run_dir, state):
        real(run_dir, state)
        raise Stop()

    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        train_run(spec(compile=True), tmp_path / "resumed", progress=False)
    monkeypatch.setattr(train, "save_checkpoint", real)
    train_run(spec(compile=True), tmp_path / "resumed", progress=False)
    wr = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert all(torch.equal(wr[k], wc[k]) for k in wc)
