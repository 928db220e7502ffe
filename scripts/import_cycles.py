#!/usr/bin/env python3
"""Fails when two modules import each other.

Checked in each crate (src/, midas-model/src/, model-import/src/), at two levels:
- siblings: each folder is one module with one file per submodule; a file's `use super::...`
  lines say which siblings it takes names from;
- the crate's top-level modules: a `crate::name` path in a module's code (comments and tests
  left out) is an arrow from that module to `name`.
Two modules with arrows both ways form a cycle: neither can be read, tested or moved without the
other. (Between crates Cargo itself forbids cycles.) Exits 1 and lists them, or prints that
there are none.

    python3 scripts/import_cycles.py
"""

import os
import re
import sys

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
roots = [os.path.normpath(os.path.join(here, r)) for r in ("src", "midas-model/src", "model-import/src")]


def code(path):
    """A file's text without its tests and comments."""
    with open(path) as source:
        text = source.read().split("#[cfg(test)]")[0]
    return "\n".join(line.split("//")[0] for line in text.splitlines())


def module_files(root):
    for folder, _, files in os.walk(root):
        for file in files:
            if file.endswith(".rs"):
                yield folder, file


edges = set()
for root in roots:
    for folder, file in module_files(root):
        module = file[:-3]
        path = os.path.join(folder, file)
        text = code(path)
        if module != "mod":
            for imported in re.findall(r"use super::(\{[^;]*\}|\w+)", text):
                for name in re.findall(r"\w+", imported):
                    if name != module and os.path.exists(os.path.join(folder, name + ".rs")):
                        edges.add((os.path.join(folder, module), os.path.join(folder, name)))
        relative = os.path.relpath(path, root).split(os.sep)
        top = relative[0][:-3] if len(relative) == 1 else relative[0]
        if top in ("lib", "main"):
            continue
        for name in set(re.findall(r"\bcrate::(\w+)", text)):
            if name != top:
                edges.add((os.path.join(root, top), os.path.join(root, name)))

cycles = sorted({tuple(sorted(edge)) for edge in edges if (edge[1], edge[0]) in edges})
for first, second in cycles:
    print(f"cycle: {os.path.relpath(first, here)} <-> {os.path.relpath(second, here)}")
if cycles:
    sys.exit(1)
print(f"no two modules import each other ({len(edges)} imports between modules checked)")
