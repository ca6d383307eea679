"""The layout a reader relies on: the core imports neither the speed paths nor the apparatus,
models.py holds no GPU code, and the README's reading order states the core's true size."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ("dynloss", "models", "spiral", "spectra", "stability", "protocol")
MACHINERY = ("fast", "apparatus", "beyond")
CORE_LINES_MAX = 2100  # the paper in plain NumPy with its derivations, read in a weekend


def imported_modules(path):
    """Top-level names of every module ``path`` imports (import x.y and from x.y import z)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_no_machinery(module):
    found = imported_modules(ROOT / f"{module}.py")
    assert not found & set(MACHINERY), f"{module}.py imports {found & set(MACHINERY)}"


def test_models_holds_no_gpu_branch():
    source = (ROOT / "models.py").read_text()
    assert not re.search(r"\b(gpu|cupy)\.", source)  # no call into a GPU module
    assert not imported_modules(ROOT / "models.py") & {"gpu", "fast", "cupy"}


def test_readme_reading_order_states_the_core_line_counts():
    readme = (ROOT / "README.md").read_text()
    counts = {m: len((ROOT / f"{m}.py").read_text().splitlines()) for m in CORE}
    for module, lines in counts.items():
        row = re.search(rf"\| `{module}\.py` \| ([\d,]+) \|", readme)
        assert row, f"README's reading order has no row for {module}.py"
        assert int(row.group(1).replace(",", "")) == lines, module
    total = re.search(r"in this order \(([\d,]+) lines\)", readme)
    assert total and int(total.group(1).replace(",", "")) == sum(counts.values())
    assert sum(counts.values()) <= CORE_LINES_MAX


def test_the_reference_path_loads_nothing_from_fast(tmp_path):
    """``train --reference`` runs the code a reader reads: no module of fast/ is even imported
    (the fast trainer and the CUDA code load only on the paths that use them)."""
    import subprocess
    import sys

    probe = (
        "import sys, run_spiral; "
        f"code = run_spiral.main(['train', '--reference', '--width', '5', '--steps', '60', "
        f"'--T', '20', '--quiet', '--out', {str(tmp_path / 'r')!r}]); "
        "print(code, sorted(m for m in sys.modules if m == 'fast' or m.startswith('fast.')))"
    )
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "0 []", r.stdout
