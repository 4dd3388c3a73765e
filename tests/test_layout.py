"""The shape of the package: imports point one way, no private name crosses a module, the
runtime and the foundations stay torch-free, method names are written only where the methods are
registered, and the docs' layout page (docs/layout.md) matches the tree."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "coopkit"

#: Layers, bottom first. A module may import modules of its own layer and of the layers listed
#: as allowed for it; the SDK core and the exporters are siblings (neither imports the other:
#: the exporter works on the classifier object it is given).
LAYERS = {
    "runtime": ("coopkit.runtime",),
    "foundation": ("coopkit", "coopkit._io", "coopkit._lazy", "coopkit._unpickle", "coopkit.config", "coopkit.userdata",
                   "coopkit.official_datasets", "coopkit.embedded", "coopkit.embedded.world"),
    "core": ("coopkit.backbone", "coopkit.features", "coopkit.heads", "coopkit.prompts", "coopkit.methods",
             "coopkit.classifier", "coopkit.runs", "coopkit.train"),
    "exporters": ("coopkit.exporters",),
    "research": ("coopkit.research", "coopkit.embedded.pretrain"),
    "cli": ("coopkit.cli", "coopkit.__main__"),
}
ALLOWED = {
    "runtime": {"runtime"},
    "foundation": {"runtime", "foundation"},
    "core": {"runtime", "foundation", "core"},
    "exporters": {"runtime", "foundation", "exporters"},
    "research": {"runtime", "foundation", "core", "exporters", "research"},
    "cli": {"runtime", "foundation", "core", "exporters", "research", "cli"},
}
#: Third-party packages each torch-free layer may import (besides the standard library).
THIRD_PARTY = {"runtime": {"numpy", "PIL", "onnxruntime", "ftfy", "tokenizers"},  # ftfy, tokenizers: optional, lazily
               "foundation": {"numpy", "PIL"}}
#: Optional extras the runtime imports lazily, inside functions (serve, ray, parquet; tqdm for progress bars).
THIRD_PARTY["runtime"] |= {"starlette", "uvicorn", "h11", "prometheus_client", "pyarrow", "ray", "tqdm",
                           "triton_python_backend_utils",  # Triton's own, inside a Triton server only
                           "openvino"}  # the openvino extra: a second engine (coopkit.runtime.engines)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str:
    best, length = None, -1
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = layer, len(prefix)
    assert best is not None, f"{module} is in no layer; add it to LAYERS"
    return best


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, names, line)`` for every import that runs (``TYPE_CHECKING`` blocks skipped),
    at module level or inside functions."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
               for stmt in node.body for n in ast.walk(stmt)}
    out: list[tuple[str, list[str], int]] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out.extend((a.name, [], node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            out.extend((f"{target}.{n}", [], node.lineno) for n in names if f"{target}.{n}" in MODULES)
            out.append((target, [n for n in names if f"{target}.{n}" not in MODULES], node.lineno))
    return out


def internal_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module in MODULES:
        edges[module] = {t for t, _, _ in imports(module) if t in MODULES and t != module}
    return edges


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_point_one_way():
    bad = []
    for module in MODULES:
        layer = layer_of(module)
        for target, _, line in imports(module):
            if target in MODULES and layer_of(target) not in ALLOWED[layer]:
                bad.append(f"{module}:{line} ({layer}) imports {target} ({layer_of(target)})")
    assert not bad, "\n".join(bad)


def test_import_graph_has_no_cycle():
    edges = internal_edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            walk(module)


def test_no_private_name_crosses_a_module():
    bad = []
    for module in MODULES:
        for target, names, line in imports(module):
            if not target.startswith("coopkit") or target == module:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                bad.append(f"{module}:{line} imports {private} from {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer", ["runtime", "foundation"])
def test_torch_free_layers_import_only_their_packages(layer):
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = []
    for module in MODULES:
        if layer_of(module) != layer:
            continue
        for target, _, line in imports(module):
            top = target.split(".")[0]
            if top != "coopkit" and top not in stdlib and top not in THIRD_PARTY[layer]:
                bad.append(f"{module}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_importing_the_torch_free_layers_loads_no_torch():
    mods = [m for m in MODULES if layer_of(m) in ("runtime", "foundation") and not m.endswith("__main__")]
    code = "import sys\n" + "".join(f"import {m}\n" for m in mods) + (
        "heavy = sorted(m for m in ('torch', 'open_clip', 'torchvision', 'onnx') if m in sys.modules)\n"
        "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_docs_layout_matches_the_tree():
    page = (ROOT / "docs" / "layout.md").read_text()
    section = page.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\s*(coopkit/[\w/]*?)/?\s{2,}", section, flags=re.M))
    listed |= {f"coopkit/{m}" for m in re.findall(r"^\s+([a-z_]+/)\s{2,}", section, flags=re.M)}
    folders = {f"coopkit/{p.relative_to(PACKAGE)}".rstrip("/") for p in PACKAGE.iterdir()
               if p.is_dir() and not p.name.startswith("__")}
    listed = {x.rstrip("/") for x in listed}
    assert folders <= listed, f"folders not in docs/layout.md: {sorted(folders - listed)}"
    assert listed <= folders | {"coopkit"}, f"docs/layout.md lists folders that do not exist: {sorted(listed - folders)}"


#: Strings that equal a method's name but name something else: the ``coopkit zeroshot`` command.
NOT_METHOD_NAMES = {("coopkit.cli.base", "zeroshot"), ("coopkit.cli.train", "zeroshot")}


def test_method_names_are_written_only_in_the_methods_modules():
    """A method's name (and its ``coopkit bench`` rows) appears as a string literal only in
    :mod:`coopkit.methods`: every other module asks the registry (``__all__`` lists of function
    names aside)."""
    from coopkit import methods

    rows = {r for m in methods.names() for r in (m, *methods.get(m).variants)}
    assert "coop" in rows and "tip-adapter-f" in rows  # the scan looks for the real names
    bad = []
    for module, path in MODULES.items():
        if module == "coopkit.methods" or module.startswith("coopkit.methods."):
            continue
        tree = ast.parse(path.read_text())
        exported = {id(n) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
                    for n in ast.walk(node.value)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in rows \
                    and id(node) not in exported and (module, node.value) not in NOT_METHOD_NAMES:
                bad.append(f"{module}:{node.lineno} writes the method name {node.value!r}")
    assert not bad, "\n".join(bad)


def test_the_version_is_written_once():
    """pyproject.toml reads the version from ``coopkit.__version__`` instead of writing it again."""
    import tomllib

    from setuptools.config.expand import read_attr

    import coopkit

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert read_attr("coopkit.__version__", root_dir=ROOT) == coopkit.__version__
