"""The dependency arrows of DESIGN.md: cli -> launch -> trainer -> {models, data, parallel,
optim, checkpoint} -> parallel/dims, config. Checked twice: what importing each package pulls in,
in a fresh interpreter, and every import statement in its source (lazy ones inside functions
included)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import skipjack

ROOT = Path(skipjack.__file__).parent
WIRING = ("skipjack.trainer", "skipjack.launch", "skipjack.cli")
FORBIDDEN = {
    "parallel": WIRING + ("skipjack.optim", "skipjack.checkpoint"),
    "models": WIRING + ("skipjack.optim", "skipjack.checkpoint", "skipjack.data"),
    "optim": WIRING + ("skipjack.checkpoint", "skipjack.parallel.pipeline"),
    "checkpoint": WIRING + ("skipjack.models",),
    "trainer": ("skipjack.launch", "skipjack.cli"),  # the launcher hands it rank, world, device
}


def _modules(package: str) -> list[str]:
    return sorted(
        "skipjack." + ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / package).rglob("*.py")
    )


def _is_under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("package", FORBIDDEN)
def test_source_imports_follow_the_arrows(package):
    wrong = []
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            wrong += [
                f"{path.relative_to(ROOT)}: {n}" for n in names if _is_under(n, FORBIDDEN[package])
            ]
    assert not wrong, wrong


def test_importing_each_package_pulls_in_nothing_upstream():
    """Each package's modules imported in a fresh interpreter; what skipjack modules came with."""
    script = (
        "import importlib, json, sys\n"
        "mods = json.loads(sys.argv[1])\n"
        "for m in mods: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('skipjack'))))\n"
    )
    for package, forbidden in FORBIDDEN.items():
        modules = _modules(package)
        out = subprocess.run(
            [sys.executable, "-c", script, json.dumps(modules)],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        loaded = json.loads(out.strip().splitlines()[-1])
        assert not [m for m in loaded if _is_under(m, forbidden)], (package, loaded)
