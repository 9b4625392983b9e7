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
    """Each package's modules imported in one fresh interpreter, skipjack's modules forgotten
    between packages; what skipjack modules came with each."""
    script = (
        "import importlib, json, sys\n"
        "for package, mods in json.loads(sys.argv[1]).items():\n"
        "    for m in [m for m in sys.modules if m.startswith('skipjack')]:\n"
        "        del sys.modules[m]\n"
        "    for m in mods:\n"
        "        importlib.import_module(m)\n"
        "    loaded = sorted(m for m in sys.modules if m.startswith('skipjack'))\n"
        "    print(json.dumps([package, loaded]))\n"
    )
    modules = {package: _modules(package) for package in FORBIDDEN}
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(modules)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("[")]
    assert [package for package, _ in lines] == list(FORBIDDEN)
    for package, loaded in lines:
        assert not [m for m in loaded if _is_under(m, FORBIDDEN[package])], (package, loaded)
