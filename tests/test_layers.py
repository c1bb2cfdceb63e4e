"""The package's layers run one way: each package imports only the layers below it (function-level imports
included), so that media decoding sits under boxes and data, data owns its config, and conversion of released
weights sits above model and data."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mgllava"

# what each package (or top-level module) may import from mgllava; the entry points at the top may use all
ALLOWED = {
    "utils": set(),
    "config": set(),
    "media": {"utils"},
    "boxes": {"media", "utils", "config"},
    "model": {"utils", "config"},
    "data": {"model", "boxes", "media", "utils", "config"},
    "convert": {"data", "model", "boxes", "media", "utils", "config"},
    "inference": {"convert", "data", "model", "boxes", "media", "utils", "config"},
    "train": {"convert", "data", "model", "boxes", "media", "utils", "config"},
    "eval": {"inference", "convert", "data", "model", "boxes", "media", "utils", "config"},
    "serve": {"inference", "data", "boxes", "media", "utils", "config"},
    "harness": {"inference", "eval", "boxes", "data", "model", "media", "utils", "config"},
    "vllm": {"data", "model", "boxes", "media", "utils", "config"},
}


def _package(path: Path) -> str:
    parts = path.relative_to(SRC).parts
    return parts[0].removesuffix(".py")


def _imported(path: Path) -> set[str]:
    """The mgllava packages a module imports (absolute `mgllava.x` or relative to the package root)."""
    tree = ast.parse(path.read_text())
    depth = len(path.relative_to(SRC).parts) - 1  # 0 for top-level modules, 1 for package modules, ...
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("mgllava."):
                found.add(node.module.split(".")[1])
            elif node.level > depth:  # climbs to the package root: `from ..data import x`
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("mgllava."))
    return found


def test_every_package_imports_only_the_layers_below_it():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        package = _package(path)
        if package not in ALLOWED:
            continue  # cli, chat, demo, __init__: entry points over the library
        for target in _imported(path) - {package}:
            if target not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(SRC)} imports mgllava.{target}")
    assert not wrong, "\n".join(wrong)


def test_the_layer_table_knows_every_package():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__"}
    assert packages - set(ALLOWED) == {"demo"} and modules - set(ALLOWED) == {"cli", "chat"}
