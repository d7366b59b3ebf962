"""The one-way flow, checked: detector -> ledger files -> misalign -> reports (docs/architecture.md).

- no module of `detector/` imports `reports` (parsed with `ast`, so a lazy import inside a function
  counts too);
- no module of `misalign/` imports `detector` or `reports`;
- torch stays in `misalign.nms`: importing every other misalign module and running an analysis
  (misalign.compare on a small synthetic ledger, no rescoring) leaves torch unloaded.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_top_names(path: Path) -> set[str]:
    """Top-level package names of every import in the file (module level and inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def modules_of(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package, forbidden", [("detector", {"reports"}), ("misalign", {"detector", "reports"})])
def test_package_does_not_import_downstream(package, forbidden):
    offenders = {str(p.relative_to(ROOT)): sorted(imported_top_names(p) & forbidden) for p in modules_of(package)}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_misalign_uses_torch_only_in_nms(tmp_path):
    script = f"""
import importlib, json, pkgutil, sys
import misalign
names = [m.name for m in pkgutil.iter_modules(misalign.__path__, "misalign.") if m.name != "misalign.nms"]
for name in names:
    importlib.import_module(name)
from misalign.synthetic import synthetic_ledger
from misalign.compare import compare
from misalign.metrics import analyze
from misalign.ledger import read_ledger
folder = {str(tmp_path / "dump")!r}
gt = synthetic_ledger(folder, num_images=4, cands_per_image=40, num_categories=2, kept_per_image=5)
result = compare([folder], before_after_nms=True, bootstrap=5)
analyze(read_ledger(folder), gt, bootstrap=0)
assert result.metrics["detectors"], result.metrics
print(json.dumps({{"modules": names, "torch": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "misalign.compare" in report["modules"] and "misalign.rescore" in report["modules"]
    assert report["torch"] == [], report["torch"]
