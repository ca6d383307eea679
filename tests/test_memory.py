"""Every command's planned memory (apparatus/memory.py) against its measured peak.

Each case runs tests/memory_peak.py in a fresh interpreter at two sizes: the command's check
gives the estimate, then the command runs and the peak resident memory is read from
resource.getrusage. The workers run as threads there (memory_peak.py), so that the jobs
running at once are all in that one peak, as the plan counts them. The estimate must be within MEMORY_TOLERANCE of the peak
both ways: below it, a plan accepted at 80% of the machine could need more than the machine;
far above it, a feasible run would be refused.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MEMORY_TOLERANCE = 1.3
TINY_SYNTHETIC = ["--data", "synthetic", "--synthetic-train", "40", "--synthetic-test", "8",
                  "--image-size", "32", "--epochs", "1", "--batch", "8", "--eval-batch", "8"]  # fmt: skip
SPIRAL_SHORT = ["--steps", "20", "--T", "5"]

# name: (script, argv before the size, the size's option, two sizes)
CASES = {
    "train": ("run_spiral.py", ["train", *SPIRAL_SHORT], "--width", ("30000", "50000")),
    "train --reference": (
        "run_spiral.py",
        ["train", *SPIRAL_SHORT, "--reference"],
        "--width",
        ("15000", "30000"),
    ),  # fmt: skip
    "phase": (
        "run_spiral.py",
        ["phase", "--A", "1,3", "--T", "5", "--seeds", "2", "--seed-block", "1", "--steps", "20"],
        "--width",
        ("20000", "40000"),
    ),  # fmt: skip
    "dynamics": (
        "run_spiral.py",
        [
            "dynamics",
            *SPIRAL_SHORT,
            "--hess-every",
            "5",
            "--ntk-every",
            "5",
            "--zoom-every",
            "0",
            "--log-every",
            "5",
            "--val-every",
            "5",
        ],
        "--width",
        ("10000", "20000"),
    ),  # fmt: skip
    "threshold": (
        "run_spiral.py",
        [
            "threshold",
            "--lrs",
            "1,2",
            "--T0",
            "5",
            "--steps0",
            "20",
            "--static-steps",
            "20",
            "--hess-every",
            "5",
        ],
        "--widths",
        ("10000", "20000"),
    ),  # fmt: skip
    "density": (
        "run_spiral.py",
        ["density", *SPIRAL_SHORT, "--at", "0,10", "--probes", "2", "--lanczos-steps", "40"],
        "--width",
        ("10000", "20000"),
    ),  # fmt: skip
    "onset": (
        "run_spiral.py",
        ["onset", "--T0", "5", "--periods", "2", "--seed", "0"],
        "--width",
        ("300", "500"),
    ),  # fmt: skip
    "check": ("run_spiral.py", ["check"], "--width", ("250", "400")),
    "cifar train": ("run_cifar.py", ["train", *TINY_SYNTHETIC], "--channels", ("64", "128")),
    "cifar phase": (
        "run_cifar.py",
        ["phase", *TINY_SYNTHETIC, "--A", "3", "--T", "5", "--seeds", "1"],
        "--channels",
        ("64", "128"),
    ),  # fmt: skip
    "cifar check": ("run_cifar.py", ["check"], "--width", ("150", "300")),
}


def measure(script, argv, out):
    """(estimate, measured peak) in bytes of one command run in a fresh interpreter."""
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "memory_peak.py"), script, *argv,
                        *(["--out", str(out), "--quiet"] if "check" not in argv else [])],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    line = [x for x in r.stdout.splitlines() if x.startswith("estimate=")]
    assert r.returncode == 0 and line, r.stderr[-2000:]
    v = {k: float(x) for k, x in (kv.split("=") for kv in line[0].split())}
    return v, v["estimate"]


@pytest.mark.parametrize("name", CASES)
def test_the_planned_memory_is_the_measured_peak_within_the_tolerance(name, tmp_path):
    script, argv, option, sizes = CASES[name]
    for size in sizes:
        v, estimate = measure(script, [*argv, option, size], tmp_path / f"out-{size}")
        measured = v["self"]
        ratio = estimate / measured
        assert 1 / MEMORY_TOLERANCE <= ratio <= MEMORY_TOLERANCE, (
            f"{name} at {option} {size}: planned {estimate / 2**20:.0f} MiB, measured "
            f"{measured / 2**20:.0f} MiB (ratio {ratio:.2f})"
        )
