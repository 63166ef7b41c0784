"""Fakes shared by the tests and the bench scripts (never used by the package itself).

:mod:`ctiqa.testing.fake_gemini` (a fake Gemini API on 127.0.0.1, spoken to by the real google-genai SDK; run it
standalone with ``python -m ctiqa.testing.fake_gemini --latency 1.0``), :mod:`ctiqa.testing.loopback` (the HTTP
plumbing of the fake servers) and :mod:`ctiqa.testing.sft_data` (a small learnable chat-format CT dataset). They
live in the package so that ``bench/`` does not import ``tests/``; :func:`load_script` imports a recipe script;
:func:`lock_held_elsewhere` holds an output's lock from another process, as a second run would;
:func:`wait_for_lock_release` waits for a killed run's process to be gone (its lock freed).
"""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType


def load_script(path: str | Path, name: str) -> ModuleType:
    """Import a script that is not in a package (``recipes/sft.py``, ``recipes/grpo.py``) as module ``name``, so
    tests can call its functions. Raises FileNotFoundError when ``path`` does not exist."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def lock_held_elsewhere(output: str | Path) -> Iterator[None]:
    """Hold ``<output>.lock`` (:func:`ctiqa.paths.lock_output`'s lock) from another process for the ``with`` block,
    as a second ``ctiqa`` run writing the same output would (a lock in this process would not conflict)."""
    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom filelock import FileLock\n"
                               f"with FileLock({str(output) + '.lock'!r}):\n print('held', flush=True)\n"
                               " time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        if holder.stdout.readline().strip() != "held":
            raise RuntimeError("the lock holder did not start")
        yield
    finally:
        holder.kill()
        holder.wait()


def wait_for_lock_release(output: str | Path, timeout: float = 60) -> None:
    """Wait until ``<output>.lock`` (:func:`ctiqa.paths.lock_output`'s lock) is free: a run killed with SIGKILL
    holds it until the system has ended its process, a few ms after the kill returns (a process group killed
    through its launcher is not waited for). Raises ``filelock.Timeout`` after ``timeout`` s."""
    from filelock import FileLock

    lock = FileLock(str(output) + ".lock", timeout=timeout)
    lock.acquire()
    lock.release()
