"""The package layering of the README's Layout section holds: no import points up (function-level imports count),
and the inference API imports without Lightning."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ldm"

# What each package may import besides itself (README, Layout). The top-level modules (cli, precompute, the
# package __init__) sit above everything.
ALLOWED = {
    "nn": set(),
    "diffusion": set(),
    "data": set(),
    "formats": {"nn", "diffusion"},
    "evaluation": {"nn", "diffusion", "data", "formats"},
    "models": {"nn", "diffusion", "data", "formats", "evaluation"},  # the QualityMetrics callback
    "pipeline": {"nn", "diffusion", "data", "formats"},
}


def _ldm_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported ldm package) of every import in ``path``, wherever in the file it is."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "ldm" else [f"ldm.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "ldm" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def test_every_package_is_in_the_layer_table():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages == set(ALLOWED), "add the new package to ALLOWED and to the README's Layout section"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_upward_import(package):
    upward = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, target in _ldm_imports(path):
            if target != package and target not in ALLOWED[package]:
                upward.append(f"{path.relative_to(ROOT.parent)}:{line} imports ldm.{target}")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


def test_the_walker_sees_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from ldm.models.latent_diffusion import LatentDiffusion\n    import ldm.data.images\n")
    assert _ldm_imports(source) == [(2, "models"), (3, "data")]


def test_the_inference_api_imports_without_lightning():
    code = ("import sys, ldm\nfrom ldm import LatentDiffusionPipeline\nfrom ldm.pipeline import LatentDiffusionPipeline\n"
            "import ldm.formats, ldm.data.images\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'torchmetrics', 'litdata'))\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def _module_graph() -> dict[str, set[str]]:
    """ldm module -> the ldm modules it imports at run time (anywhere in the file), by dotted name."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # annotations only: not imported at run time
                continue
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                            for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_cycle_between_modules():
    graph = _module_graph()
    # A package's __init__ re-exporting its own modules is not a cycle to follow.
    graph = {m: {t for t in targets if not (m.startswith(t + ".") and t in graph)} for m, targets in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
