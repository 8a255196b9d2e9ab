"""The package's layout (README "Architecture"): each part imports only the parts below it, and
the daemon imports nothing of the lab or the tests. Read from the sources' import statements,
so a new import that runs the wrong way fails here, naming the file and what it imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "daemon" / "uplinkd"
# Top to bottom. A part may import those below it; the last row is the base every part may use.
LAYERS = [
    {"cli", "ctl"},
    {"runtime"},
    {"publish"},
    {"hooks"},
    {"monitor"},
    {"datapath"},
    {"facts"},
    {"planning"},
    {"config"},
    {"background", "trust", "const", "errors", "__init__"},
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def module_of(path: Path) -> tuple[str, str]:
    """(module, package) of a file, dotted."""
    parts = list(path.relative_to(ROOT / "daemon").with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def imports(path: Path) -> list[str]:
    """The absolute modules (or module.name) a file imports."""
    _, package = module_of(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found += [f"{source}.{alias.name}" for alias in node.names]
    return found


def part(module: str) -> str:
    """The layout part of an uplinkd module: its sub-package, or the top-level module."""
    parts = module.split(".")
    if len(parts) > 1 and ((PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").exists()):
        return parts[1]
    return "__init__"  # the package itself, or a name it defines (__version__)


def test_every_part_is_in_the_layout() -> None:
    parts = {part(module_of(path)[0]) for path in PACKAGE.rglob("*.py")}
    assert parts <= set(RANK), parts - set(RANK)


def test_imports_run_down_the_layers_only() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = part(module_of(path)[0])
        for target in imports(path):
            if target.startswith("uplinkd.") and RANK[part(target)] < RANK[here]:
                wrong.append(f"{path.relative_to(ROOT)} ({here}) imports {target}")
            elif (
                target.startswith("uplinkd.")
                and RANK[here] == RANK[part(target)]
                and here != part(target)
                and here not in LAYERS[-1]
            ):
                wrong.append(f"{path.relative_to(ROOT)} ({here}) imports its peer {target}")
    assert not wrong, "\n".join(wrong)


def test_the_daemon_imports_neither_the_lab_nor_the_tests() -> None:
    wrong = [
        f"{path.relative_to(ROOT)} imports {target}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for target in imports(path)
        if target.split(".")[0] in {"uplinkd_lab", "tests", "pytest", "netfilterqueue"}
    ]
    assert not wrong, "\n".join(wrong)
