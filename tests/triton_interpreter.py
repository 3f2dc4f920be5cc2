"""Run a check function of a test module in a fresh Python process under the Triton interpreter
(TRITON_INTERPRET=1 has to be set before Triton kernels are defined, so it cannot be switched on
inside the test process). The check prints "checked" when it gets to its end."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def allow_loaded_loop_bounds() -> None:
    """Let a loop bound loaded from memory (`range(start, end)` with `start = tl.load(...)`) work in
    the interpreter with numpy >= 2.3: a loaded scalar is a 1-element array there, and the
    interpreter's `int(array)` is refused ("only 0-dimensional arrays can be converted"). Compiled
    kernels are unaffected."""
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def run_in_interpreter(module: str, check: str, timeout: int = 900) -> None:
    code = f"import tests.triton_interpreter as i; i.allow_loaded_loop_bounds(); import {module} as t; t.{check}()"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "checked" in proc.stdout, proc.stdout[-2000:]
