"""Where ctiqa keeps files between runs: one cache folder for every cache (teacher answers, Batch API jobs,
simulator sinograms).

``$CTIQA_CACHE_DIR`` when set, else the platform's user cache folder for ``ctiqa`` from ``platformdirs``
(Linux: ``$XDG_CACHE_HOME/ctiqa``, default ``~/.cache/ctiqa``; macOS: ``~/Library/Caches/ctiqa``; Windows:
``%LOCALAPPDATA%\\ctiqa\\Cache``). Caches live outside any output folder on purpose: deleting or rewriting a
dataset or a run never deletes paid-for teacher answers or hours of projections.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that moves every ctiqa cache.
CACHE_ENV = "CTIQA_CACHE_DIR"


def cache_home() -> Path:
    """The ctiqa cache folder (module docstring); not created here."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return platformdirs.user_cache_path("ctiqa", appauthor=False)


def cache_path(*parts: str) -> Path:
    """``cache_home() / parts...``, e.g. ``cache_path("sinograms")``."""
    return cache_home().joinpath(*parts)


def is_local_path(name: str) -> bool:
    """True when a model or dataset name is meant as a local folder, not a Hub id: it exists (``~`` expanded), is
    absolute, starts with ``.`` or ``~``, or has more than one ``/`` (Hub ids are ``name`` or ``owner/name``)."""
    p = Path(name).expanduser()
    return p.exists() or p.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1
