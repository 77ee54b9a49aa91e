"""The shape of the package: files, lines, import arrows between its modules, import cycles, long functions, and
imports hidden inside functions. Reads the source as text (nothing is imported or run).

    python bench/structure.py                       # this checkout's src/torchdiffusion
    python bench/structure.py --root OTHER/src/torchdiffusion --json out.json

An arrow A -> B is a module-level or function-level ``import`` in A of a module B of the package (a package's
``__init__`` counts as its own module); cycles are the strongly connected components of more than one module.
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

LONG_FUNCTION = 50  # lines


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(node: ast.ImportFrom | ast.Import, current: str, is_pkg: bool, modules: set[str]) -> list[str]:
    """The package modules an import statement names."""
    out = []
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    base = current if is_pkg else current.rsplit(".", 1)[0]
    if node.level:
        for _ in range(node.level - 1):
            base = base.rsplit(".", 1)[0]
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    for a in node.names:
        if f"{target}.{a.name}" in modules:
            out.append(f"{target}.{a.name}")
        elif target in modules:
            out.append(target)
    return out


def measure(root: Path) -> dict:
    files = sorted(p for p in root.rglob("*.py"))
    modules = {module_name(p, root): p for p in files}
    edges: set[tuple[str, str]] = set()
    long_functions, hidden = [], 0
    lines = 0
    for name, path in modules.items():
        src = path.read_text()
        lines += len(src.splitlines())
        tree = ast.parse(src)
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > LONG_FUNCTION:
                    long_functions.append((f"{name}.{node.name}", n))
                hidden += sum(isinstance(s, (ast.Import, ast.ImportFrom)) for s in ast.walk(node))
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in resolve(node, name, is_pkg, set(modules)):
                    if target != name:
                        edges.add((name, target))
    return {"files": len(files), "lines": lines, "import_arrows": len(edges), "cycles": cycles(modules, edges),
            "functions_over_50_lines": sorted(long_functions, key=lambda t: -t[1]), "imports_inside_functions": hidden}


def cycles(modules, edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), ignoring package -> own submodule
    arrows of an ``__init__`` that only re-exports (those are not cycles a reader has to untangle)."""
    graph = {m: [b for a, b in edges if a == m and not b.startswith(m + ".")] for m in modules}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in modules:
        if m not in index:
            visit(m)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[1] / "src" / "torchdiffusion"))
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    a = p.parse_args(argv)
    r = measure(Path(a.root))
    print(f"| files | lines | import arrows | cycles | functions > {LONG_FUNCTION} lines | imports inside functions |")
    print("|---|---|---|---|---|---|")
    print(f"| {r['files']} | {r['lines']} | {r['import_arrows']} | {len(r['cycles'])} | "
          f"{len(r['functions_over_50_lines'])} | {r['imports_inside_functions']} |")
    for c in r["cycles"]:
        print("cycle:", " <-> ".join(c))
    for f, n in r["functions_over_50_lines"]:
        print(f"long: {f} ({n} lines)")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
