"""Imports only go down: every dha module imports only modules of lower layers of
docs/architecture.md (module-level and function-level imports alike), so there are no cycles.

The layers are read from the document itself, so the document and the code cannot drift apart:
a new module must be placed in a layer there before this test passes.
"""

from __future__ import annotations

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "architecture.md")
PACKAGE = os.path.join(REPO, "dha")
# Modules that branches being merged add (listed in the document ahead of them); empty this set
# once they are all in.
PENDING: set[str] = set()


def documented_layers() -> dict[str, int]:
    """module -> layer number, from the numbered list under "## Layers" of docs/architecture.md."""
    with open(DOC) as f:
        text = f.read()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers, layer = {}, None
    for line in section.splitlines():
        start = re.match(r"^(\d+)\. ", line)
        if start:
            layer = int(start.group(1))
            continue
        module = re.match(r"^\s+- `(\w+)`", line)
        if module:
            assert layer is not None, f"{module.group(1)} is listed before any layer"
            assert module.group(1) not in layers, f"{module.group(1)} is listed twice"
            layers[module.group(1)] = layer
    return layers


def dha_imports(source: str, depth: int = 0) -> set[str]:
    """The dha modules a file imports anywhere in it (top level, functions, try blocks). `depth` 1:
    the file is in a subpackage of dha (dha/cli/), whose own modules (`from .x`) are its inside."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level == depth + 1:
                found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif node.level == 0 and node.module and node.module.split(".")[0] == "dha":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
            elif node.level > depth + 1:
                found.add(f"<import above the package: level {node.level}>")
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("dha."))
    return found


def violations(imports: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Every import that does not go to a strictly lower layer (or goes to an unlisted module)."""
    out = []
    for module, targets in sorted(imports.items()):
        for target in sorted(targets):
            if target not in layers:
                out.append(f"dha/{module}.py imports {target}, which docs/architecture.md does not place")
            elif layers[target] >= layers[module]:
                out.append(f"dha/{module}.py (layer {layers[module]}) imports {target} (layer {layers[target]})")
    return out


def package_imports() -> dict[str, set[str]]:
    """module -> the dha modules it imports; a subpackage (dha/cli/) is one module, the union of its files'
    imports. dha/remote_code/ holds file templates dha never imports: it is not a module here."""
    out = {}
    for name in sorted(os.listdir(PACKAGE)):
        path = os.path.join(PACKAGE, name)
        if name.endswith(".py"):
            with open(path) as f:
                out[name[:-3]] = dha_imports(f.read())
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            out[name] = set()
            for file in sorted(os.listdir(path)):
                if file.endswith(".py"):
                    with open(os.path.join(path, file)) as f:
                        out[name] |= dha_imports(f.read(), depth=1) - {name}
    return out


def test_every_module_is_placed_in_one_layer():
    layers, modules = documented_layers(), set(package_imports())
    assert not modules - set(layers), f"modules docs/architecture.md does not place: {sorted(modules - set(layers))}"
    absent = set(layers) - modules - PENDING
    assert not absent, f"docs/architecture.md lists modules dha/ does not have: {sorted(absent)}"


def test_imports_only_go_down():
    layers = documented_layers()
    imports = {m: targets for m, targets in package_imports().items() if m in layers}
    assert violations(imports, layers) == []


def test_the_check_sees_upward_same_layer_and_function_level_imports():
    layers = {"low": 1, "mid": 2, "peer": 2, "high": 3}
    source = "from .low import x\n\ndef f():\n    from .high import y\n    from dha import peer\n"
    assert dha_imports(source) == {"low", "high", "peer"}
    assert violations({"mid": dha_imports(source)}, layers) == [
        "dha/mid.py (layer 2) imports high (layer 3)",
        "dha/mid.py (layer 2) imports peer (layer 2)",
    ]
    assert violations({"mid": {"nowhere"}}, layers) == [
        "dha/mid.py imports nowhere, which docs/architecture.md does not place"
    ]


def test_a_subpackage_imports_its_own_modules_freely_and_dha_from_two_dots():
    source = "from .common import x\nfrom ..low import y\nfrom .. import peer\nfrom ...up import z\n"
    assert dha_imports(source, depth=1) == {"low", "peer", "<import above the package: level 3>"}


MAX_FUNCTION_LINES = 60  # a function fits a screen


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(name, lines) of the functions of `source` longer than `limit` lines, from `def` to the end."""
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit
    ]


def test_no_function_is_longer_than_a_screen():
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path) as f:
                    found.update({f"{os.path.relpath(path, REPO)}:{fn}": n for fn, n in long_functions(f.read())})
    assert found == {}, f"functions over {MAX_FUNCTION_LINES} lines: {found}"


def test_the_length_check_counts_from_def_to_the_last_line():
    source = "def short():\n    return 1\n\n\ndef long():\n" + "    x = 1\n" * 60 + "    return x\n"
    assert long_functions(source) == [("long", 62)]
