"""What a benchmark ran on, printed with its numbers: the CPU model, cores, and the versions of
Python, NumPy and the BLAS NumPy calls (timings are only comparable within one machine)."""

from __future__ import annotations

import os
import platform

import numpy as np
from threadpoolctl import threadpool_info


def cpu_name():
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def blas():
    """The BLAS libraries loaded in this process: 'openblas 0.3.31 (pthreads)', ..."""
    libs = [
        f"{i['internal_api']} {i['version']} ({i.get('threading_layer', '?')})"
        for i in threadpool_info()
        if i["user_api"] == "blas"
    ]
    return ", ".join(libs) or "unknown"


def describe():
    """One line: CPU, cores, Python, NumPy, BLAS."""
    return (
        f"machine: {cpu_name()}, {os.cpu_count()} cores; python {platform.python_version()}, "
        f"numpy {np.__version__}, BLAS {blas()}"
    )
