"""Where ctiqa keeps files between runs: one cache folder for every cache (teacher answers, Batch API jobs,
simulator sinograms); and the one guard every command applies to its outputs (:func:`check_output_path`).

``$CTIQA_CACHE_DIR`` when set, else the platform's user cache folder for ``ctiqa`` from ``platformdirs``
(Linux: ``$XDG_CACHE_HOME/ctiqa``, default ``~/.cache/ctiqa``; macOS: ``~/Library/Caches/ctiqa``; Windows:
``%LOCALAPPDATA%\\ctiqa\\Cache``). Caches live outside any output folder on purpose: deleting or rewriting a
dataset or a run never deletes paid-for teacher answers or hours of projections. Files are replaced with
:func:`atomic_write`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

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


#: Written by ``ctiqa build-dataset`` into every dataset folder it makes (a JSON list of the files it wrote there):
#: a non-empty folder without it holds someone else's files; commands refuse to write their outputs inside one.
DATASET_MARKER = ".ctiqa-dataset.json"


def is_local_path(name: str) -> bool:
    """True when a model or dataset name is meant as a local folder, not a Hub id: it exists (``~`` expanded), is
    absolute, starts with ``.`` or ``~``, or has more than one ``/`` (Hub ids are ``name`` or ``owner/name``)."""
    p = Path(name).expanduser()
    return p.exists() or p.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1


def check_source_folder(name: str, what: str, marker: str) -> None:
    """Fail early, naming ``name``, when it is meant as a local folder (:func:`is_local_path`) that is missing or
    lacks ``marker`` (e.g. ``config.json`` of a model); anything else is left to the Hub client.

    Raises:
        CTIQAError: the folder does not exist, is a file, or has no ``marker`` file.
    """
    from ctiqa import CTIQAError

    if not is_local_path(name):
        return
    p = Path(name).expanduser()
    if not p.exists():
        raise CTIQAError(f"{what} {name}: no such folder (and not a Hub id of the form owner/name)")
    if not p.is_dir():
        raise CTIQAError(f"{what} {name}: is a file; give the folder that holds {marker}")
    if not (p / marker).is_file():
        raise CTIQAError(f"{what} {name}: folder has no {marker}; is this the right folder?")


# ------------------------------------------------------------------------------------------------ output guard
def _listing(folder: Path, limit: int = 5) -> str:
    files = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(files[:limit]) + (f" and {len(files) - limit} more" if len(files) > limit else "")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(
    out: str | os.PathLike,
    *,
    what: str = "--out",
    folder: bool = False,
    ours: str | Callable[[Path], bool] | bool | None = None,
    inputs: Iterable[str | os.PathLike | None] = (),
    writes: Iterable[str] = (),
    hint: str = "",
) -> Path:
    """Refuse, before any work, an output path whose writing would replace something ctiqa did not write.

    The one home of the rule every ctiqa command applies to its outputs (nothing the user has is lost): an output
    that is one of the command's ``inputs`` (same file or folder, by ``os.path.samefile``), or a folder in which
    a file the command ``writes`` is an input, is refused; a file output that is a folder, or a folder output that
    is a file, or an output under a file (``notes.txt/x.png``), is refused; an existing non-empty output that is
    not ``ours`` is refused. Nothing is created or changed here.

    Args:
        out: the output file (``folder=False``) or folder (``folder=True``).
        what: how the output is named in the message (the option, e.g. ``--out``, ``--html``).
        folder: ``out`` is a folder that the command fills.
        ours: how ctiqa recognises its own earlier output: a marker file name inside the folder (``folder=True``;
            e.g. ``.ctiqa-tiny-model``), or a predicate on ``out``. ``None``/``False``: no existing non-empty output
            is ours; ``True``: any existing output may be replaced (only ``inputs`` are protected).
        inputs: paths the command reads (``None`` entries are skipped).
        writes: (``folder=True``) names of the files the command writes in ``out``; one that is an input is refused.
        hint: appended to the message (what to do instead).
    Returns:
        ``out`` as an absolute, normalised path (``a/missing/../b`` -> ``a/b``); for a symbolic link to nothing (a
        dangling link), its target's path, judged as the output (the command creates it, and the link then leads
        there).
    Raises:
        CTIQAError: one of the cases above, or a link that loops; the message names ``out`` and says that nothing
            was changed.
    """
    from ctiqa import CTIQAError

    # `missing/../X` is X once the command has made `missing` (mkdir parents=True), but the kernel calls it
    # missing now: judge the lexically normalised path, as it will be written
    p, writes = Path(os.path.normpath(os.path.abspath(os.path.expanduser(out)))), tuple(writes)
    tail = f"; nothing was changed{'. ' + hint if hint else ''}"
    if p.is_symlink() and not p.exists():  # a dangling link: follow it and judge (then create) its target, as
        target = Path(os.path.realpath(p))  # `ctiqa export` does; mkdir on the link itself fails "File exists"
        if target.is_symlink():
            raise CTIQAError(f"{what} {p}: is a symbolic link that loops ({os.readlink(p)}){tail}")
        if folder and not any(_same(target, i) for i in inputs if i is not None):
            # made now, empty: a command that writes through the link path (its mkdir) then finds a folder there
            try:
                target.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CTIQAError(f"{what} {p}: links to {target}, which cannot be made ({e.strerror or e}){tail}") \
                    from e
        p = target
    for i in inputs:
        if i is None:
            continue
        i = Path(i)
        if _same(p, i) or any(_same(p / w, i) for w in writes):
            raise CTIQAError(f"{what} {p}: is (or holds) the input {i}; writing there would replace it{tail}")
    if not p.exists():
        blocked = next((a for a in p.parents if a.exists() and not a.is_dir()), None)
        if blocked is not None:  # mkdir(parents=True) would fail later with a bare "File exists"
            raise CTIQAError(f"{what} {p}: {blocked} is a file, not a folder{tail}")
        return p
    if folder:
        if not p.is_dir():
            raise CTIQAError(f"{what} {p}: is a file; give a folder{tail}")
        if not any(p.iterdir()):
            return p
        is_ours = (p / ours).is_file() if isinstance(ours, str) else ours is True or bool(callable(ours) and ours(p))
        if not is_ours:
            raise CTIQAError(f"{what} {p}: holds files ctiqa did not write here ({_listing(p)}){tail}")
        return p
    if p.is_dir():
        raise CTIQAError(f"{what} {p}: is a folder; give a file name{tail}")
    if p.stat().st_size == 0:
        return p
    if not (ours is True or (callable(ours) and ours(p))):
        raise CTIQAError(f"{what} {p}: exists and was not written by ctiqa{tail}")
    return p


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a new file to write that replaces ``path`` only when the ``with`` block ends without an error.

    The data goes to a fresh, uniquely named hidden file in ``path``'s folder (``.NAME.<random>.tmp``, from
    ``tempfile.mkstemp``: it never has the name of a file the user has), then ``os.replace`` puts it at ``path``:
    a crash or kill leaves the old file whole, and a ``path`` that is a symbolic link is replaced as a link
    (its target is not written through). The new file keeps the permissions of the file it replaces (``0o644``
for a new one).
    The parent folder must exist.

    Args:
        path: the file to write.
        mode: ``"w"`` (text) or ``"wb"``.
        open_kwargs: passed to ``open`` (e.g. ``newline=""``).
    Raises:
        OSError: the folder cannot be written (the temporary file is removed).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:100]}.", suffix=".tmp")
    try:
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.is_file() else 0o644)  # mkstemp makes it 0o600
        with open(fd, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_outside_dataset(out: str | os.PathLike, dataset: str | None = None, *, what: str = "--out") -> None:
    """Refuse, before any work, an output folder that is a dataset folder or inside one: the local ``dataset``
    (:func:`is_local_path`; compared by resolved path, symlinks followed), or any folder holding
    :data:`DATASET_MARKER`. Files written there would mix into a dataset that ``push_to_hub`` publishes as is.
    Nothing is created or changed here.

    Raises:
        CTIQAError: ``out`` is, or is inside, a dataset folder (the message names both).
    """
    from ctiqa import CTIQAError

    p = Path(os.path.realpath(os.path.expanduser(out)))
    folders = [p, *p.parents]
    hit = None
    if dataset and is_local_path(dataset) and Path(dataset).expanduser().is_dir():
        ds = Path(os.path.realpath(os.path.expanduser(dataset)))
        hit = ds if ds in folders else None
    hit = hit or next((f for f in folders if (f / DATASET_MARKER).is_file()), None)
    if hit is not None:
        where = "is the dataset folder" if hit == p else f"is inside the dataset folder {hit}"
        raise CTIQAError(f"{what} {out}: {where}; what is written there would become part of the dataset (and of "
                         f"its Hub upload); nothing was changed. Give an {what} outside it")


def check_dataset_finished(dataset: str | os.PathLike) -> None:
    """Refuse a local dataset folder that ``ctiqa build-dataset`` began but did not finish: it holds
    :data:`DATASET_MARKER` (written first) but no ``README.md`` (written last), so its splits may be half of one
    build and half of another. Hub ids and other folders pass.

    Raises:
        CTIQAError: naming the folder and the way out (the same build-dataset again finishes it).
    """
    from ctiqa import CTIQAError

    p = Path(os.path.expanduser(str(dataset)))
    if is_local_path(str(dataset)) and (p / DATASET_MARKER).is_file() and not (p / "README.md").is_file():
        raise CTIQAError(f"dataset {dataset}: an unfinished `ctiqa build-dataset` (stopped while writing: no "
                         "README.md yet), its splits possibly from two builds; run the same build-dataset again to "
                         "finish it")


def move_aside(files: Iterable[Path], what: str, why: str = "--overwrite") -> None:
    """Rename each existing file or folder in ``files`` to ``NAME.<UTC time>.bak[.EXT]`` (``<UTC time>-2`` ... when
    that name is taken) beside it (never deleted:
    the user can go back), with one ``note: {why}: ...`` line each on stderr naming ``what`` it belonged to (e.g.
    "evaluation")."""
    import sys
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for f in files:
        if f.exists():
            backup, n = f.with_name(f"{f.stem}.{stamp}.bak{f.suffix}"), 1
            while backup.exists() or backup.is_symlink():  # an earlier backup of the same second, or a user's file
                n += 1
                backup = f.with_name(f"{f.stem}.{stamp}-{n}.bak{f.suffix}")
            f.replace(backup)
            print(f"note: {why}: moved the previous {what}'s {f.name} to {backup}", file=sys.stderr)


def lock_output(path: Path, what: str, *, option: str = "--out") -> Any:
    """Take the exclusive lock of an output ``path`` (a ``filelock.FileLock`` on ``<path>.lock``, which stays
    beside it, empty and harmless) or refuse: two runs writing one output would mix or replace each other's work.
    Release it with ``.release()`` (or use it as a context manager).

    Args:
        path: the output file or folder. what: the command, for the message (e.g. "ctiqa predict").
        option: how the output is named in the message (e.g. ``output_dir`` for a training recipe).
    Raises:
        CTIQAError: another run holds the lock, or its folder cannot be written.
    """
    from filelock import FileLock, Timeout

    from ctiqa import CTIQAError

    lock = FileLock(str(path) + ".lock", timeout=0)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK):  # filelock reports a lock file it cannot create as "held"
            raise CTIQAError(f"{option} {path}: cannot write in {path.parent} (permission denied, or a read-only "
                             "file system); choose another one")
        lock.acquire()
    except Timeout:
        if not os.path.exists(lock.lock_file):  # no lock file: it could not be made, nobody holds it
            raise CTIQAError(f"{option} {path}: cannot write in {path.parent} (the lock file {lock.lock_file} "
                             f"cannot be made); choose another {option}") from None
        raise CTIQAError(f"{option} {path}: another {what} run is writing it (locked by {lock.lock_file}); wait for "
                         f"it to finish or choose another {option}") from None
    except OSError as e:
        raise CTIQAError(f"{option} {path}: cannot write ({e.strerror or e})") from e
    return lock
