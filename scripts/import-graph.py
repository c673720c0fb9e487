#!/usr/bin/env python3
"""Which file of src/ uses which, and the cycles among them.

    scripts/import-graph.py            # the cycles (strongly connected groups of files), if any
    scripts/import-graph.py --edges    # every edge "a.rs -> b.rs"
    scripts/import-graph.py --dot      # Graphviz

A file uses another when it names an item path that resolves into it: `crate::a::b`,
`super::x`, `self::x` (in `use` lines and inline paths) or `tokenar::...` in the binary.
Paths are resolved to the longest existing module file (through the library root's
re-exports); test modules (`tests.rs`, `tests/`, inline `#[cfg(test)] mod`) are left out, since
a test may use anything it tests. Exit status 1 when there is a cycle.
"""
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def module_of(path: Path) -> list:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts == ["main"]:
        return ["<bin>"]  # the binary's root, beside the library's (lib.rs)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return parts


def file_of(mod: list, files: dict):
    """The longest prefix of `mod` that is a module file."""
    for n in range(len(mod), -1, -1):
        key = tuple(mod[:n])
        if key in files:
            return files[key]
    return None


def expand_use(text: str):
    """Paths named in `use` trees and inline paths, as lists of segments."""
    out = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        out.extend(flatten(m.group(1).replace("\n", " ")))
    for m in re.finditer(r"\b((?:crate|super|self|tokenar)(?:::\w+)+)", text):
        out.append(m.group(1).split("::"))
    return out


def flatten(tree: str):
    tree = tree.strip()
    i = tree.find("{")
    if i < 0:
        return [[p.strip() for p in tree.split(" as ")[0].split("::") if p.strip()]]
    prefix = [p for p in tree[:i].rstrip(":").split("::") if p.strip()]
    body, depth, items, cur = tree[i + 1: tree.rfind("}")], 0, [], ""
    for ch in body:
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    items.append(cur)
    res = []
    for it in items:
        if it.strip():
            for sub in flatten(it):
                res.append(prefix + sub)
    return res


def main():
    files = {}
    for p in SRC.rglob("*.rs"):
        if p.name == "tests.rs" or "tests" in p.relative_to(SRC).parts[:-1]:
            continue
        files[tuple(module_of(p))] = p
    # Names the library root re-exports (`pub use error::{Error, Result};`): a path through the
    # root is an edge to where the name lives.
    reexports = {}
    for path in expand_use(re.sub(r"//[^\n]*", "", (SRC / "lib.rs").read_text())):
        if path and path[0] not in ("crate", "super", "self") and len(path) > 1:
            reexports[path[-1]] = path[:-1]
    edges = set()
    for key, p in files.items():
        text = re.sub(r"//[^\n]*", "", p.read_text())
        text = re.split(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text)[0]  # inline test modules
        here = list(key)
        for path in expand_use(text):
            if not path:
                continue
            if p.name == "lib.rs" and path[0] not in ("crate", "super", "self"):
                path = ["crate"] + path  # the library root's `use` paths start at the crate
            if path[0] in ("crate", "tokenar"):
                target = path[1:]
            elif path[0] in ("super", "self"):
                base = here
                if path[0] == "self":
                    path = path[1:]
                while path and path[0] == "super":
                    base = base[:-1]
                    path = path[1:]
                target = base + path
            else:
                continue
            if target and target[0] in reexports:
                target = reexports[target[0]] + target[1:]
            f = file_of(target, files)
            if f is not None and f != p:
                edges.add((p, f))
    rel = lambda f: str(f.relative_to(SRC))
    if "--edges" in sys.argv:
        for a, b in sorted(edges, key=lambda e: (rel(e[0]), rel(e[1]))):
            print(f"{rel(a)} -> {rel(b)}")
        return
    if "--dot" in sys.argv:
        print("digraph imports {")
        for a, b in sorted(edges):
            print(f'  "{rel(a)}" -> "{rel(b)}";')
        print("}")
        return
    # Tarjan's strongly connected components.
    graph = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
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
                sccs.append(comp)

    for v in list(files.values()):
        if v not in index:
            visit(v)
    print(f"{len(files)} files, {len(edges)} edges, {len(sccs)} cycle(s)")
    for comp in sccs:
        print("cycle: " + ", ".join(sorted(rel(f) for f in comp)))
    sys.exit(1 if sccs else 0)


if __name__ == "__main__":
    main()
