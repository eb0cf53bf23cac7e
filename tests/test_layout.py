"""The shape of the house: one seam to third-party internals, no import circles, functions a reader can hold."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("peft_ext", "trl_recipes")
# internal modules of the libraries peft_ext builds on; only peft_ext/_compat.py may import from them
INTERNAL = ("peft.tuners", "peft.utils.integrations", "peft.utils.other", "peft.utils.constants",
            "transformers.pytorch_utils", "transformers.integrations", "transformers.modeling_utils", "bitsandbytes")
SEAM = os.path.join("peft_ext", "_compat.py")


def _modules(package: str) -> dict[str, str]:
    """dotted module name -> path, for every .py file of a package."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(path: str, module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) of every import statement, at any depth, relative ones resolved."""
    tree = ast.parse(open(path).read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((base, [a.name for a in node.names], node.lineno))
    return found


def _all_modules() -> dict[str, str]:
    mods = {}
    for p in PACKAGES:
        mods.update(_modules(p))
    return mods


def test_private_internals_are_imported_in_the_compat_seam_only():
    offenders = []
    for module, path in _all_modules().items():
        if os.path.relpath(path, ROOT) == SEAM:
            continue
        for target, names, line in _imports(path, module):
            private = [n for n in names if n.startswith("_")] if target.split(".")[0] in ("peft", "transformers") else []
            if target.startswith(INTERNAL) or private:
                offenders.append(f"{os.path.relpath(path, ROOT)}:{line} imports {target} {private or ''}".strip())
    assert not offenders, "private third-party internals outside peft_ext/_compat.py:\n" + "\n".join(offenders)


def test_the_compat_seam_refuses_a_peft_outside_the_supported_range():
    """peft_ext builds on one peft release line's internals: another peft fails at import, naming the range and the
    fix, instead of deep inside a layer (the installed peft imports, so it lies inside the range)."""
    code = "import peft; peft.__version__ = '0.20.0'; import peft_ext"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: peft_ext needs peft >= 0.21.2, < 0.22") and "Fix: pip install" in last


def _peft_ext_imports(path: str, module: str) -> list[tuple[str, list[str], int]]:
    """(module path, names) of every import of peft_ext, and `peft_ext.NAME` attribute uses after `import peft_ext`."""
    found = [(t, names, line) for t, names, line in _imports(path, module) if t.split(".")[0] == "peft_ext"]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "peft_ext":
            found.append(("peft_ext", [node.attr], node.lineno))
    return found


def _client_files() -> dict[str, str]:
    """Every .py file of the clients of peft_ext in this repository: the recipes, the benchmarks and the tests."""
    out = {}
    for package in ("trl_recipes", "benchmarks", "tests"):
        out.update(_modules(package))
    return out


def test_clients_use_peft_ext_s_public_api():
    """Nothing outside peft_ext imports a private peft_ext module (a part of its path starts with "_") or a private
    name; the recipes, a client like any user's script, import only what `peft_ext.__all__` exports."""
    import peft_ext

    offenders = []
    for module, path in _client_files().items():
        for target, names, line in _peft_ext_imports(path, module):
            private = any(part.startswith("_") for part in target.split(".")) or any(
                n.startswith("_") and not n.endswith("__") for n in names)
            outside_api = module.startswith("trl_recipes") and (
                target != "peft_ext" or any(n not in peft_ext.__all__ for n in names))
            if private or outside_api:
                offenders.append(f"{os.path.relpath(path, ROOT)}:{line} imports {target} {names}")
    assert not offenders, "peft_ext internals used by its clients:\n" + "\n".join(offenders)


def test_the_public_api_is_documented():
    import peft_ext

    api = open(os.path.join(ROOT, "docs", "api.md")).read()
    missing = [name for name in peft_ext.__all__ if f"`{name}" not in api and name != "__version__"]
    assert not missing, f"docs/api.md does not document {missing}"


def test_no_import_circles():
    """The graph of imports between this project's modules, function-level imports included, has no cycle; so no
    lazy import is there to break one."""
    mods = _all_modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for target, names, _ in _imports(path, module):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in mods and cand != module:
                    graph[module].add(cand)
                    break
    # a package's __init__ importing its own submodules is how packages are built, not a circle
    for module in graph:
        graph[module] = {t for t in graph[module] if not module.startswith(t + ".")}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_functions_fit_in_a_reader_s_head():
    long = []
    for module, path in {**_modules("peft_ext"), **_modules("trl_recipes")}.items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_packages_import_without_undeclared_modules():
    """A fresh `pip install -e .` must run the default job: importing peft_ext and the recipes must not need a module
    that only a test extra brings, such as `attr` (peft's own CorDA module imports it without declaring it)."""
    code = ("import sys; sys.modules['attr'] = None; sys.modules['pytest'] = None; "
            "import peft_ext, trl_recipes.sft, trl_recipes.evaluate; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_every_benchmark_imports():
    """A benchmark is run rarely and by hand: an import it lost (a helper moved elsewhere) is found here, not an hour
    into a run."""
    names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "benchmarks"))
                   if f.endswith(".py") and f != "__init__.py")
    code = "import importlib; [importlib.import_module('benchmarks.' + n) for n in %r]; print('ok')" % names
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
