"""The package's architecture, checked: import directions along the data path, the public API, docstrings.

The allowed import directions (the same table as ``docs/architecture.md``; a subpackage may always import itself):

=============  ==================================================================
importer       may import (from ``traitloc``)
=============  ==================================================================
``engine``     nothing
``data``       nothing
``metrics``    nothing
``io``         engine, data
``models``     engine, data, io, metrics
``pipelines``  engine, data, io, metrics, models
``cli``        engine, data, io, metrics, models, pipelines
``apps``       engine, data, io, metrics, models, pipelines (``apps/``, packaged as ``traitloc.apps``)
top            engine, data, io, metrics, models, pipelines (``traitloc/__init__.py``: the lazy public API)
=============  ==================================================================

``from traitloc import __version__`` is allowed everywhere; any other import of the top package (``import
traitloc``, ``from traitloc import load_clip``) only in ``cli`` and ``apps``, since the top package re-exports
the library and would close a cycle. Every import counts: module level, inside functions, under
``if TYPE_CHECKING:``, absolute or relative. Nothing imports ``cli``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import traitloc

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("engine", "data", "metrics", "io", "models", "pipelines", "cli")
LIBRARY = ("engine", "data", "metrics", "io", "models", "pipelines")
#: importer -> the subpackages it may import (besides itself)
ALLOWED: dict[str, frozenset[str]] = {
    "engine": frozenset(),
    "data": frozenset(),
    "metrics": frozenset(),
    "io": frozenset({"engine", "data"}),
    "models": frozenset({"engine", "data", "io", "metrics"}),
    "pipelines": frozenset({"engine", "data", "io", "metrics", "models"}),
    "cli": frozenset(LIBRARY),
    "apps": frozenset(LIBRARY),
    "top": frozenset(LIBRARY),
}
#: importers that may use the top package's public API (``from traitloc import load_clip``)
TOP_API_USERS = frozenset({"cli", "apps"})


def _sources() -> list[tuple[str, Path]]:
    """(dotted module name, file) of every module under ``traitloc/`` and ``apps/`` (as ``traitloc.apps``)."""
    out = []
    for path in sorted((ROOT / "traitloc").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    for path in sorted((ROOT / "apps").rglob("*.py")):
        parts = ["traitloc", "apps", *path.relative_to(ROOT / "apps").with_suffix("").parts]
        out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return out


def _layer(module: str) -> str:
    """The subpackage (``engine``, ``models``, ..., ``apps``) of a dotted ``traitloc`` module; ``top`` for the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "top"


def imports_of(module: str, path: Path) -> list[tuple[int, str, str | None]]:
    """Every ``traitloc`` import in a file: (line, imported module, name taken from it or None), relative ones
    resolved, at any depth (functions, ``if TYPE_CHECKING:``, ``try``)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "traitloc"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "traitloc":
                found += [(node.lineno, target, a.name) for a in node.names]
    return found


def _violation(importer: str, target: str, name: str | None) -> str | None:
    """Why ``importer`` may not import ``target`` (``from target import name``), or None when it may."""
    src = _layer(importer)
    if target == "traitloc":
        if name == "__version__":
            return None
        if name in LAYERS or name == "apps":  # ``from traitloc import models``: the subpackage
            target = f"traitloc.{name}"
        elif src in TOP_API_USERS or src == "top":
            return None
        else:
            return "the top package (the lazy public API) is for users and the command line; import the module"
    dst = _layer(target)
    if dst == src:
        return None
    if dst == "cli":
        return "nothing imports the command line"
    if dst not in ALLOWED[src]:
        return f"{src} may import only {', '.join(sorted(ALLOWED[src])) or 'nothing else from traitloc'}"
    return None


def test_the_sources_are_found() -> None:
    mods = dict(_sources())
    assert {"traitloc", "traitloc.cli.commands", "traitloc.engine.cam", "traitloc.apps.review"} <= set(mods)
    assert {_layer(m) for m in mods} == {*LAYERS, "apps", "top"}


def test_import_directions() -> None:
    """Each subpackage imports only the ones below it on the data path (the table in the module docstring)."""
    bad = []
    for module, path in _sources():
        for line, target, name in imports_of(module, path):
            why = _violation(module, target, name)
            if why:
                what = f"from {target} import {name}" if name else f"import {target}"
                bad.append(f"{path.relative_to(ROOT)}:{line}: {what}: {why}")
    assert not bad, "imports against the architecture (docs/architecture.md):\n" + "\n".join(bad)


def test_the_import_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    """Function-level, TYPE_CHECKING and relative imports are all found and judged."""
    f = tmp_path / "m.py"
    f.write_text(
        "from typing import TYPE_CHECKING\n"
        "from traitloc import __version__\n"
        "if TYPE_CHECKING:\n    from traitloc.models.clip import ClipBundle\n"
        "def f():\n    from ..pipelines import runner\n    import traitloc.cli.commands\n"
        "from . import files\nfrom .. import metrics\n"
    )
    found = imports_of("traitloc.io.x", f)
    assert sorted(found) == [
        (2, "traitloc", "__version__"),
        (4, "traitloc.models.clip", "ClipBundle"),
        (6, "traitloc.pipelines", "runner"),
        (7, "traitloc.cli.commands", None),
        (8, "traitloc.io", "files"),
        (9, "traitloc", "metrics"),
    ]
    verdicts = [_violation("traitloc.io.x", t, n) is None for _, t, n in sorted(found)]
    assert verdicts == [True, False, False, False, True, False]
    assert _violation("traitloc.engine.cam", "traitloc", "load_clip") is not None
    assert _violation("traitloc.cli.commands", "traitloc", "load_clip") is None
    assert _violation("traitloc.apps.review", "traitloc.cli.app", None) is not None


# ------------------------------------------------------------------------------------------------------------------
# the public API
# ------------------------------------------------------------------------------------------------------------------
def test_import_traitloc_is_light() -> None:
    """``import traitloc`` (and the version) loads neither torch nor open_clip: the API is imported on first use."""
    code = (
        "import sys, traitloc; from traitloc import __version__; "
        "heavy = sorted(m for m in ('torch', 'open_clip', 'torchcam', 'numpy', 'pandas') if m in sys.modules); "
        "assert not heavy, heavy; print(len(traitloc.__all__))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) == len(traitloc.__all__)


def test_every_public_name_resolves_and_is_documented() -> None:
    """Each name of ``traitloc.__all__`` imports from where it lives, is the same object, and has a docstring."""
    assert traitloc.__all__[0] == "__version__" and len(set(traitloc.__all__)) == len(traitloc.__all__)
    from traitloc import _LAZY

    for name in traitloc.__all__[1:]:
        obj = getattr(traitloc, name)
        assert obj is getattr(importlib.import_module(_LAZY[name]), name), name
        assert inspect.getdoc(obj), f"traitloc.{name} has no docstring"
    assert set(traitloc.__all__) <= set(dir(traitloc))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        traitloc.no_such_name  # noqa: B018


def test_the_public_api_is_what_type_checkers_see() -> None:
    """The ``if TYPE_CHECKING:`` imports of ``traitloc/__init__.py`` name exactly ``__all__``, from ``_LAZY``."""
    from traitloc import _LAZY

    tree = ast.parse((ROOT / "traitloc" / "__init__.py").read_text(encoding="utf-8"))
    seen = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom)
                for a in imp.names:
                    assert a.asname == a.name, "re-export as `import x as x` so type checkers see it as public"
                    seen[a.name] = imp.module
    assert seen == _LAZY


def test_every_command_is_a_module_with_add_parser_and_run() -> None:
    """``traitloc.cli.commands`` only collects the command modules: each has ``add_parser`` and ``run``, and every
    command of the parser dispatches to its module's ``run``."""
    from traitloc.cli import commands

    parser = commands.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(commands.COMMANDS)  # type: ignore[arg-type]
    for name in commands.SUBCOMMAND_MODULES:
        mod = importlib.import_module(f"traitloc.{name}")
        assert inspect.getdoc(mod.add_parser) and inspect.getdoc(mod.run), name
        assert _layer(mod.__name__) in ("pipelines", "cli"), name
    assert "pipelines.localize" in commands.SUBCOMMAND_MODULES


def test_cli_main_module_does_not_run_on_import() -> None:
    """``--doctest-modules`` imports ``traitloc.cli.__main__``: it must not parse sys.argv or exit."""
    importlib.import_module("traitloc.cli.__main__")


# ------------------------------------------------------------------------------------------------------------------
# docstrings
# ------------------------------------------------------------------------------------------------------------------
def _modules() -> list[ModuleType]:
    names = ["traitloc"] + [m.name for m in pkgutil.walk_packages(traitloc.__path__, "traitloc.")]
    return [importlib.import_module(n) for n in names]


def _own_doc(cls: type) -> str | None:
    """A class's own docstring; None for none, or for the one ``dataclass``/``NamedTuple`` make up."""
    doc = cls.__dict__.get("__doc__")
    if not doc or not doc.strip():
        return None
    if (dataclasses.is_dataclass(cls) or hasattr(cls, "_fields")) and doc.startswith(f"{cls.__name__}("):
        return None
    return doc


def _public_members(mod: ModuleType) -> list[tuple[str, Any]]:
    """Functions and classes a module defines, in its public namespace (``__all__``, else names without ``_``)."""
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [n for n in vars(mod) if not n.startswith("_")]
    out = []
    for n in names:
        obj = getattr(mod, n, None)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == mod.__name__:
            out.append((n, obj))
    return out


def undocumented() -> list[str]:
    """``module.name`` of every public module, function, class and method without a docstring."""
    missing = []
    for mod in _modules():
        if not (mod.__doc__ or "").strip():
            missing.append(f"{mod.__name__} (module)")
        for name, obj in _public_members(mod):
            where = f"{mod.__name__}.{name}"
            if inspect.isfunction(obj):
                if not inspect.getdoc(obj):
                    missing.append(where)
                continue
            if _own_doc(obj) is None:
                missing.append(where)
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if not (inspect.isfunction(member) or isinstance(member, property)):
                    continue
                # inherited docs count: an override documented in its base class is documented
                if not inspect.getdoc(getattr(obj, attr)):
                    missing.append(f"{where}.{attr}")
    return missing


def test_every_public_function_has_a_docstring() -> None:
    missing = undocumented()
    assert not missing, f"{len(missing)} public names without a docstring:\n" + "\n".join(missing)
