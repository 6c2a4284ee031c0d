"""Every benchmark in ``bench/`` starts: its imports resolve against the package and its options parse.

The benchmarks are not run here (they measure, the suite checks); this keeps a renamed function or module from
breaking one silently between the sessions that run it (``bench/gpu_check.py`` also runs in test_gpu_check)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"

#: runs each script with --help in one interpreter (one torch import); prints the scripts that failed
PROBE = """
import contextlib, io, runpy, sys
failed = []
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    try:
        with contextlib.redirect_stdout(io.StringIO()) as text:
            runpy.run_path(path, run_name="__main__")
        failed.append(f"{path}: --help did not exit")
    except SystemExit as done:
        if done.code not in (0, None) or "usage:" not in text.getvalue():
            failed.append(f"{path}: exit {done.code}")
    except Exception as error:
        failed.append(f"{path}: {type(error).__name__}: {error}")
print("\\n".join(failed))
"""


def test_every_benchmark_imports_and_parses_its_options() -> None:
    scripts = sorted(str(p) for p in BENCH.glob("*.py"))
    assert len(scripts) >= 7
    done = subprocess.run([sys.executable, "-c", PROBE, *scripts], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", done.stdout
