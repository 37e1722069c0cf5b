"""Copies the results tables (results/*/table.md) into README.md between their markers."""

import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")
readme = os.path.join(ROOT, "README.md")
text = open(readme).read()
for tag, src in (("gcr-table", "results/gcr/table.md"), ("quant-table", "results/quant/table.md"),
                 ("quant-gcr-table", "results/quant_gcr/table.md"),
                 ("mixed-table", "results/mixed/table.md"), ("main-table", "results/main/table.md"),
                 ("deploy-table", "results/deploy/table.md"),
                 ("bench-table", "results/deploy/bench.md")):
  if not os.path.exists(os.path.join(ROOT, src)):
    print(f"{src} does not exist yet: {tag} left as it is")
    continue
  table = open(os.path.join(ROOT, src)).read().strip()
  pattern = re.compile(rf"(<!-- {tag} [^>]*-->\n).*?(\n<!-- /{tag} -->)", re.S)
  text, n = pattern.subn(lambda m: m.group(1) + table + m.group(2), text)
  assert n == 1, f"marker {tag} not found exactly once"
tmp = readme + ".tmp"
open(tmp, "w").write(text)
os.replace(tmp, readme)
