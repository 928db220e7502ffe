#!/usr/bin/env python3
"""Fails when two sibling modules import each other.

Each folder under src/ is one module with one file per submodule; a file's `use super::...`
lines (outside its tests) say which siblings it takes names from. Two files that take names
from each other form a cycle: neither can be read, tested or moved without the other. Exits 1
and lists them, or prints that there are none.

    python3 scripts/import_cycles.py
"""

import os
import re
import sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
edges = set()
for folder, _, files in os.walk(root):
    for file in files:
        module = file[:-3]
        if not file.endswith(".rs") or module == "mod":
            continue
        with open(os.path.join(folder, file)) as source:
            text = source.read().split("#[cfg(test)]")[0]
        for imported in re.findall(r"use super::(\{[^;]*\}|\w+)", text):
            for name in re.findall(r"\w+", imported):
                if name != module and os.path.exists(os.path.join(folder, name + ".rs")):
                    edges.add((os.path.join(folder, module), os.path.join(folder, name)))

cycles = sorted({tuple(sorted(edge)) for edge in edges if (edge[1], edge[0]) in edges})
for first, second in cycles:
    print(f"cycle: {os.path.relpath(first, root)} <-> {os.path.relpath(second, root)}")
if cycles:
    sys.exit(1)
print(f"no two sibling modules import each other ({len(edges)} imports between siblings)")
