#!/usr/bin/env python3
"""Report import cycles between modules (files) of each crate in the workspace.

A file's module path is derived from its location under src/. An edge A -> B exists when file A
mentions `crate::x::y` (in a use or a path; comments and doc links do not count) and B is the longest existing module prefix of x::y.
Edges to a module's own ancestors (`super` chains of mod.rs re-exports) count like any other.
Prints strongly connected components of size > 1 per crate; exit 1 when any exist.
"""
import os, re, sys

def modules(src):
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith('.rs'):
                continue
            p = os.path.join(root, f)
            rel = os.path.relpath(p, src)[:-3].split(os.sep)
            if rel[-1] in ('mod', 'lib', 'main'):
                rel = rel[:-1]
            if rel and rel[0] == 'bin':
                continue
            mods['::'.join(rel)] = p
    return mods

def strip_tests(text):
    # drop #[cfg(test)] mod tests { ... } blocks crudely: from the marker to end of file
    m = re.search(r'#\[cfg\(test\)\]\s*mod\s+\w+\s*\{', text)
    return text[:m.start()] if m else text

def refs(text, mod, mods):
    out = set()
    # comments (doc links included) name modules without importing them
    text = re.sub(r'//[^\n]*', '', strip_tests(text))
    # expand `use crate::{a, b::c}` groups
    for m in re.finditer(r'crate::((?:\w+::)*)\{([^;]*?)\}', text, re.S):
        base = m.group(1)
        for part in re.split(r',', m.group(2)):
            part = part.strip().split(' as ')[0].strip()
            if part and part != 'self':
                out.add(base + part.replace(' ', ''))
            elif part == 'self':
                out.add(base.rstrip(':'))
    for m in re.finditer(r'crate::((?:\w+::)*\w+)', text):
        out.add(m.group(1))
    # super:: paths
    parts = mod.split('::') if mod else []
    for m in re.finditer(r'\b((?:super::)+)((?:\w+::)*\w+)', text):
        n = m.group(1).count('super::')
        base = parts[:-n] if n <= len(parts) else []
        out.add('::'.join(base + m.group(2).split('::')))
    targets = set()
    for r in out:
        segs = r.split('::')
        for k in range(len(segs), 0, -1):
            cand = '::'.join(segs[:k])
            if cand in mods:
                targets.add(cand)
                break
    targets.discard(mod)
    return targets

def sccs(graph):
    index, low, stack, on, res, i = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)
    def visit(v):
        index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            res.append(comp)
    for v in graph:
        if v not in index:
            visit(v)
    return res

def is_ancestor(a, b):
    return a == '' or b.startswith(a + '::')

def main(root):
    bad = 0
    for dirpath, dirs, files in os.walk(root):
        if 'target' in dirpath.split(os.sep) or '/.git' in dirpath or '/fuzz' in dirpath:
            continue
        if 'Cargo.toml' in files and os.path.isdir(os.path.join(dirpath, 'src')):
            src = os.path.join(dirpath, 'src')
            mods = modules(src)
            graph = {}
            for mod, path in mods.items():
                text = open(path).read()
                # a parent module declaring its children (mod x; pub use x::Y) is not an import
                # of the child in the sense of layering; child -> parent edges are kept.
                edges = {t for t in refs(text, mod, mods) if not is_ancestor(mod, t)}
                graph[mod] = edges
            for comp in sccs(graph):
                if len(comp) > 1:
                    bad += 1
                    print(f"{os.path.relpath(dirpath, root)}: cycle of {len(comp)} modules: {sorted(comp)}")
                    for a in sorted(comp):
                        for b in sorted(graph[a]):
                            if b in comp:
                                print(f"    {a} -> {b}")
    if not bad:
        print("no import cycles")
    return 1 if bad else 0

if __name__ == '__main__':
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else '.'))
