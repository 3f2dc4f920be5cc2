"""Run a check function of a test module in a fresh Python process under the Triton interpreter
(TRITON_INTERPRET=1 has to be set before Triton kernels are defined, so it cannot be switched on
inside the test process). The check prints "checked" when it gets to its end."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_in_interpreter(module: str, check: str, timeout: int = 900) -> None:
    code = f"import {module} as t; t.{check}()"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "checked" in proc.stdout, proc.stdout[-2000:]
