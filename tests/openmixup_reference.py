"""Loading one augment file of a Westlake-AI/openmixup checkout without its package (mmcv etc.)."""
import importlib.util
import sys
import types
from pathlib import Path


def load_openmixup(monkeypatch, root, name):
    """Import ``openmixup/models/augments/<name>.py`` from ``root`` with its package imports stubbed."""
    utils = types.ModuleType("openmixup.models.utils")
    utils.batch_shuffle_ddp = None  # the distributed path is not used
    utils.to_2tuple = lambda v: v if isinstance(v, (tuple, list)) else (v, v)  # openmixup's _ntuple(2)
    for mod in ("openmixup", "openmixup.models"):
        monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))
    monkeypatch.setitem(sys.modules, "openmixup.models.utils", utils)
    path = Path(root) / "openmixup" / "models" / "augments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"openmixup_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
