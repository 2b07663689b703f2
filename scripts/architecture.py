"""Draw the package's layers from its real imports: ``python scripts/architecture.py`` writes
``docs/architecture.png`` and exits 1 naming the cycle if two parts import each other (directly or not).

A part is a sub-package (``chatmusician/train/``) or a top-level module (``chatmusician/cli.py``); its layer is
one more than the highest layer it imports, so every arrow points down and the picture is the dependency order."""

from __future__ import annotations

import ast
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "chatmusician"
LAZY = re.compile(r"chatmusician(\.\w+)+:\w+")


def import_graph(package: Path = PACKAGE) -> Counter[tuple[str, str]]:
    """(importing part, imported part) -> number of import statements, over every module of the package."""
    edges: Counter[tuple[str, str]] = Counter()
    for path in package.rglob("*.py"):
        source = path.relative_to(package).with_suffix("").parts[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (
                isinstance(node, ast.Constant) and isinstance(node.value, str) and LAZY.fullmatch(node.value)
            ):
                names = [node.value.partition(":")[0]]  # the CLI's registry imports lazily, by name
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == package.name and len(parts) > 1 and parts[1] != source:
                    edges[(source, parts[1])] += 1
    return edges


def layers(parts: set[str], edges: Counter[tuple[str, str]]) -> dict[str, int]:
    """Each part's layer (0 = imports no other part); raises ValueError naming a cycle."""
    deps = {p: {b for a, b in edges if a == p} for p in parts}
    level: dict[str, int] = {}

    def visit(part: str, path: tuple[str, ...]) -> int:
        if part in path:
            raise ValueError("import cycle: " + " -> ".join((*path[path.index(part) :], part)))
        if part not in level:
            level[part] = 1 + max((visit(d, (*path, part)) for d in deps[part]), default=-1)
        return level[part]

    for part in sorted(parts):
        visit(part, ())
    return level


def draw(level: dict[str, int], edges: Counter[tuple[str, str]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[int, list[str]] = {}
    for part, n in sorted(level.items()):
        rows.setdefault(n, []).append(part)
    width = max(len(r) for r in rows.values())
    pos = {p: ((i + 0.5) * width / len(row), n) for n, row in rows.items() for i, p in enumerate(row)}
    fig, ax = plt.subplots(figsize=(1.6 * width + 1, 1.3 * len(rows) + 0.6))
    for (a, b), count in edges.items():
        (x0, y0), (x1, y1) = pos[a], pos[b]
        ax.annotate(
            "",
            xy=(x1, y1 + 0.18),
            xytext=(x0, y0 - 0.18),
            arrowprops={
                "arrowstyle": "->",
                "color": "#8a8a8a",
                "lw": 0.6 + 0.15 * min(count, 10),
                "alpha": 0.7,
            },
        )
    for part, (x, y) in pos.items():
        label = part + ("/" if (PACKAGE / part).is_dir() else ".py")
        ax.text(
            x,
            y,
            label,
            ha="center",
            va="center",
            fontsize=10,
            family="monospace",
            bbox={
                "boxstyle": "round,pad=0.4",
                "fc": "#e8f0fe" if (PACKAGE / part).is_dir() else "#f5f5f5",
                "ec": "#4a6fa5",
            },
        )
    for n in rows:
        ax.text(-0.3, n, f"layer {n}", ha="right", va="center", fontsize=9, color="#666666")
    ax.set_xlim(-1.2, width + 0.2)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.axis("off")
    ax.set_title("chatmusician: who imports whom (arrows point to what is imported)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    edges = import_graph()
    parts = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())
    }
    try:
        level = layers(parts, edges)
    except ValueError as exc:
        print(f"architecture: error: {exc}", file=sys.stderr)
        return 1
    draw(level, edges, ROOT / "docs" / "architecture.png")
    for n in sorted(set(level.values())):
        print(f"layer {n}: " + ", ".join(sorted(p for p in level if level[p] == n)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
