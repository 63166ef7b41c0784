"""Fakes shared by the tests and the bench scripts (never used by the package itself).

:mod:`ctiqa.testing.fake_gemini` (a fake Gemini API on 127.0.0.1, spoken to by the real google-genai SDK; run it
standalone with ``python -m ctiqa.testing.fake_gemini --latency 1.0``), :mod:`ctiqa.testing.loopback` (the HTTP
plumbing of the fake servers) and :mod:`ctiqa.testing.sft_data` (a small learnable chat-format CT dataset). They
live in the package so that ``bench/`` does not import ``tests/``; :func:`load_script` imports a recipe script.
"""

from __future__ import annotations

import importlib.util
import sys
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
