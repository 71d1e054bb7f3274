"""Methods and evaluation suites from outside the package: plugin files, modules and entry points.

A plugin registers methods with ``@register_method`` (a ``MixMethod`` subclass, exactly
as the built-in methods in ``mixbench/methods/``) and evaluation suites with
``@register_suite`` (``mixbench.evaluations``, also importable from ``mixbench.evaluate``). It comes from one of:

- a Python file, named on the command line (``--plugins my_mix.py``) or in a benchmark
  spec (``plugins: [my_mix.py]``, relative to the spec's folder);
- an importable module, named the same way by its dotted name (``--plugins mylab.mixes``);
- an installed package that declares an entry point in the group ``mixbench.methods``
  (``[options.entry_points] mixbench.methods = mymix = mylab.mixes``): loaded on the first
  look-up of the registries, with no flag.

The registries ask this module where each name comes from (:func:`origin`): ``built-in``,
``plugin PATH``, ``module NAME`` or ``entry point NAME (DIST VERSION)``. A run of a plugin
method records the plugin in its spec (``plugins``, which a worker process imports again
before it trains: :meth:`mixbench.spec.RunSpec.from_record`) and the hash of the file that
defines the method (``method_source``, part of the run id: an edited method is a new run).

This module imports nothing else of mixbench, so that the registries can use it.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from mixbench import UsageError

ENTRY_POINT_GROUP = "mixbench.methods"
BUILTIN = "built-in"

Key = Tuple[str, str]  # (kind, name): kind is "method" or "suite"

# Where each registered name comes from (a line for `mixbench list methods`), and the reference a
# worker imports to get it again (a plugin file's absolute path or a module's dotted name; None for
# built-ins and entry points, which every process finds by itself).
_ORIGINS: Dict[Key, str] = {}
_REFS: Dict[Key, Optional[str]] = {}
_FILES: Dict[Key, Optional[str]] = {}  # the source file that defines a non-built-in name
_LOADED: Dict[str, List[Key]] = {}  # plugin reference -> what it registered
_loading: List[Tuple[str, Optional[str]]] = []  # (origin, ref) of the plugins being imported, innermost last
_registered: List[List[Key]] = []  # names registered by each plugin being imported
_entry_points_loaded = False


# ---------------------------------------------------------------------------
# Called by the registries
# ---------------------------------------------------------------------------
def note_registration(kind: str, name: str, obj: object) -> None:
    """Record where ``name`` (a method class or a suite function) comes from; called by the decorators.

    A plugin that reuses a name registered before is a usage error naming both origins.
    """
    module = getattr(obj, "__module__", "") or ""
    if _loading:
        where, ref = _loading[-1]
    elif module == "mixbench" or module.startswith("mixbench."):
        where, ref = BUILTIN, None
    else:
        where, ref = f"module {module}", (module if module != "__main__" else None)
    key = (kind, name)
    if key in _ORIGINS and _loading and _ORIGINS[key] != where:
        raise UsageError(f"{where}: {kind} {name!r} clashes with the {_ORIGINS[key]} {kind} of that name; "
                         f"give yours another name")
    _ORIGINS[key] = where
    _REFS[key] = ref
    _FILES[key] = None if where == BUILTIN else _source_file(obj)
    if _registered:
        _registered[-1].append(key)


def origin(kind: str, name: str) -> str:
    """Where a registered method or suite comes from (``built-in`` when nothing else is known)."""
    return _ORIGINS.get((kind, name), BUILTIN)


def refs_for(keys: Iterable[Key]) -> List[str]:
    """The plugin references (file paths, module names) a worker must import to find ``keys``."""
    refs = [_REFS.get(k) for k in keys]
    return list(dict.fromkeys(r for r in refs if r))


def source_hash(kind: str, name: str) -> Optional[str]:
    """A hash of the source file that defines a non-built-in method or suite (None for built-ins)."""
    path = _FILES.get((kind, name))
    if not path:
        return None
    try:
        return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12]
    except OSError as exc:
        raise UsageError(f"{kind} {name!r}: cannot read its source file {path}: {exc.strerror or exc}") from None


def _source_file(obj: object) -> Optional[str]:
    try:
        return str(Path(inspect.getsourcefile(obj) or inspect.getfile(obj)).resolve())
    except (TypeError, OSError):
        return None


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
def split_refs(values: Union[None, str, Sequence[str]]) -> List[str]:
    """``--plugins a.py,b.py --plugins c`` or a spec's list (or one string) -> one list of references."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, (list, tuple)):
        raise UsageError(f"plugins must be a list of Python files or module names, got {values!r}")
    out: List[str] = []
    for value in values:
        if not isinstance(value, str):
            raise UsageError(f"plugins must be Python files or module names, got {value!r}")
        out.extend(v.strip() for v in value.split(",") if v.strip())
    return out


def is_file_ref(ref: str) -> bool:
    """A file (``x.py``, ``dir/x``) rather than a module's dotted name (``mylab.mixes``)."""
    return ref.endswith(".py") or "/" in ref or os.sep in ref or not re.fullmatch(r"[A-Za-z_][\w.]*", ref)


def normalise_ref(ref: str, base: Optional[Path] = None) -> str:
    """A file reference as an absolute path (relative ones against ``base``, else the working folder)."""
    if not is_file_ref(ref):
        return ref
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = (Path(base) if base is not None else Path.cwd()) / path
    return str(path.resolve())


def load_plugins(refs: Union[None, str, Sequence[str]], base: Optional[Path] = None) -> List[str]:
    """Import each plugin (a file or a module) once; return their normalised references.

    Errors are one-line usage errors: a file that does not exist, an import that fails
    (the first line of its exception, and the line of the plugin it came from), a plugin
    that registers no method or suite, a name that clashes with one registered before.
    """
    load_entry_points()  # so that a plugin's name clashes with an installed one here, not later
    loaded = []
    for raw in split_refs(refs):
        ref = normalise_ref(raw, base)
        if ref not in _LOADED:
            _LOADED[ref] = _load_one(raw, ref)
        loaded.append(ref)
    return loaded


def loaded_plugins() -> Dict[str, List[Key]]:
    """Plugin reference -> the (kind, name) pairs it registered, for the plugins imported so far."""
    return {ref: list(keys) for ref, keys in _LOADED.items()}


@contextlib.contextmanager
def _registering(where: str, ref: Optional[str]) -> Iterator[List[Key]]:
    _loading.append((where, ref))
    _registered.append([])
    try:
        yield _registered[-1]
    finally:
        _loading.pop()
        _registered.pop()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _plugin_line(exc: BaseException, path: Optional[str]) -> str:
    """`` (line N)``: the deepest line of the plugin file in the exception's traceback, if any."""
    if isinstance(exc, SyntaxError) and exc.filename and path and Path(exc.filename).resolve() == Path(path):
        return f" (line {exc.lineno})" if exc.lineno else ""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if path and frame.filename and Path(frame.filename).resolve() == Path(path):
            line = frame.lineno
    return f" (line {line})" if line else ""


def _module_name(path: Path) -> str:
    stem = re.sub(r"\W", "_", path.stem)
    return f"mixbench_plugin_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def _load_one(raw: str, ref: str) -> List[Key]:
    if is_file_ref(ref):
        path = Path(ref)
        if not path.is_file():
            why = "is a folder, not a Python file" if path.is_dir() else "does not exist"
            raise UsageError(f"plugin {raw!r} {why} ({ref})")
        where = f"plugin {ref}"
        name = _module_name(path)
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise UsageError(f"plugin {raw!r} cannot be imported as Python source ({ref})")
        module = importlib.util.module_from_spec(module_spec)
        with _registering(where, ref) as keys:
            sys.modules[name] = module  # classes defined there pickle and resolve by this name
            try:
                module_spec.loader.exec_module(module)
            except UsageError:
                _forget(name, keys)
                raise
            except BaseException as exc:  # noqa: B902 - SystemExit in a plugin is a failed import too
                _forget(name, keys)
                if isinstance(exc, KeyboardInterrupt):
                    raise
                raise UsageError(f"plugin {ref} failed to import{_plugin_line(exc, ref)}: {_first_line(exc)}") from None
    else:
        where = f"module {ref}"
        with _registering(where, ref) as keys:
            try:
                importlib.import_module(ref)
            except UsageError:
                raise
            except ModuleNotFoundError as exc:
                if exc.name and ref.startswith(exc.name):
                    raise UsageError(f"plugin {ref!r} is neither a Python file nor an importable module "
                                     f"(a file needs a .py suffix or a folder: ./{ref}.py)") from None
                raise UsageError(f"plugin module {ref} failed to import: {_first_line(exc)}") from None
            except BaseException as exc:  # noqa: B902
                if isinstance(exc, KeyboardInterrupt):
                    raise
                path = getattr(sys.modules.get(ref), "__file__", None)
                raise UsageError(f"plugin module {ref} failed to import{_plugin_line(exc, path)}: "
                                 f"{_first_line(exc)}") from None
    if not keys:
        raise UsageError(f"{where} registers no method or evaluation suite (decorate a MixMethod subclass "
                         "with @register_method, or a suite with @register_suite)")
    return list(keys)


def _forget(module_name: str, keys: List[Key]) -> None:
    """Undo a plugin import that failed half-way: its module and whatever it registered."""
    sys.modules.pop(module_name, None)
    for key in keys:
        _unregister(key)


def _unregister(key: Key) -> None:
    kind, name = key
    for mapping in (_ORIGINS, _REFS, _FILES):
        mapping.pop(key, None)
    if kind == "method":
        registry = sys.modules.get("mixbench.methods._registry")
        if registry is not None:
            registry._METHODS.pop(name, None)
    else:
        registry = sys.modules.get("mixbench.evaluations._registry")
        if registry is not None:
            registry.SUITES.pop(name, None)


def load_entry_points() -> None:
    """Import the installed packages' plugins (entry-point group ``mixbench.methods``), once per process.

    One that fails to import is reported on stderr and skipped: the other methods stay usable.
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    try:
        found = entry_points(group=ENTRY_POINT_GROUP)
    except Exception as exc:  # a broken metadata folder must not stop the built-in methods
        print(f"mixbench: warning: could not list the {ENTRY_POINT_GROUP} entry points: {_first_line(exc)}",
              file=sys.stderr)
        return
    for ep in sorted(found, key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        who = f" ({dist.name} {dist.version})" if dist is not None else ""
        where = f"entry point {ep.name}{who}"
        with _registering(where, None) as keys:
            try:
                ep.load()
            except Exception as exc:
                for key in keys:
                    _unregister(key)
                print(f"mixbench: warning: {where} failed to import, its methods are unavailable: "
                      f"{_first_line(exc)}", file=sys.stderr)
                continue
        if not keys:
            print(f"mixbench: warning: {where} registers no method or evaluation suite", file=sys.stderr)
        _LOADED[f"entry-point:{ep.name}"] = list(keys)
