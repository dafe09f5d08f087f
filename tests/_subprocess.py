"""Runs a check module of the test suite in a process of its own: the fake CPU device count (or
the multi-process runtime) must be set before JAX starts, which a running pytest process cannot."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_check(module: str, marker: str, *, timeout: int = 600) -> str:
    """Runs ``python -m module`` from the repository root on the CPU and returns its stdout.

    Asserts that the process exits with status 0 and prints ``marker`` (its last line of success),
    showing the ends of its output otherwise.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert marker in proc.stdout, proc.stdout[-4000:]
    return proc.stdout
