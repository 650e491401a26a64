"""Writing files and folders so that a failure leaves nothing half-written.

:func:`atomic_dir` stages a folder beside its destination (``<dest>.partial``) and moves it into place
only when the block that fills it completes; :func:`atomic_file` does the same for one file, and
:func:`atomic_files` for files that belong together (a ``.ckpt`` and its ``pet_config``): all appear, or
none changes. They name the destination, not the staging path, in the :class:`OutputError` they raise for
an unusable location.

:func:`check_output` is the one gate every writer passes its output through first: it resolves the
output (real path and inode) and refuses one that is, contains or lies inside any of the run's inputs,
an output file that exists, and an output folder that already holds files, unless the run was told it may
replace its own files (``--overwrite``). :func:`atomic_write_text` writes a small file in one go through :func:`atomic_file`;
:func:`atomic_path` gives writers that take a file name (``savefig``, ``save_checkpoint``) the same.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator, Optional

__all__ = ["OutputError", "atomic_dir", "atomic_file", "atomic_files", "atomic_path", "atomic_write_text", "check_output",
           "check_writable_dir"]


class OutputError(OSError):
    """An output location that cannot be written; the message names it."""


def _say(path: str, e: OSError) -> str:
    return f"{path}: cannot write: {e.strerror or e}"


def _ids(path: str, depth: int = 1) -> set:
    """``(st_dev, st_ino)`` of ``path`` and, for a folder, of the entries ``depth`` levels under it."""
    out = set()
    try:
        st = os.stat(path)
    except OSError:
        return out
    out.add((st.st_dev, st.st_ino))
    if depth and os.path.isdir(path):
        try:
            names = os.listdir(path)
        except OSError:
            return out
        for name in names:
            out |= _ids(os.path.join(path, name), depth - 1)
    return out


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_output(output: str, inputs=(), what: str = "output", overwrite: Optional[bool] = None,
                 contains: bool = True) -> str:
    """The absolute path of ``output`` once it is safe to write; :class:`OutputError` naming it otherwise.

    Refused: an output that is one of ``inputs`` (same real path, or the same file reached through a link
    or a hard link), lies inside an input folder, or contains an input (it would be replaced or removed
    under the reader). With ``overwrite`` given (``False`` / ``True``: the command's ``--overwrite`` flag), an
    existing output file, and an existing non-empty output folder, are refused unless ``overwrite`` (which
    then replaces the file, or only the files the command writes in the folder). Inputs that are ``None`` or empty are skipped.
    ``contains=False`` allows an output folder that holds inputs among its files (a run's result folder
    that only adds files of its own names), though never an input at the path of a file it writes.
    """
    out = os.path.abspath(output)
    real_out = os.path.realpath(out)
    out_ids = _ids(real_out, depth=1)
    for inp in inputs:
        if not inp:
            continue
        real_in = os.path.realpath(os.path.abspath(os.fspath(inp)))
        if real_in == real_out or (out_ids and os.path.exists(real_in) and os.path.samefile(real_in, real_out)):
            raise OutputError(f"{output}: {what} is the input {inp} (refusing to overwrite an input)")
        if _inside(real_out, real_in) and os.path.isdir(real_in):
            raise OutputError(f"{output}: {what} lies inside the input folder {inp} (choose a folder of its own)")
        if contains and _inside(real_in, real_out):
            raise OutputError(f"{output}: {what} contains the input {inp} (choose a folder of its own)")
        if contains and out_ids and out_ids & _ids(real_in, depth=1):
            raise OutputError(f"{output}: {what} holds a file of the input {inp} (a link or hard link to it)")
    if overwrite is not None and not overwrite and os.path.lexists(out):
        if not os.path.isdir(out):
            raise OutputError(f"{output}: {what} exists (--overwrite replaces it)")
        if os.listdir(out):
            raise OutputError(f"{output}: {what} folder is not empty (--overwrite replaces this command's own files "
                              f"in it and leaves the others)")
    return out


def check_writable_dir(directory: str) -> None:
    """Raise :class:`OutputError` naming ``directory`` unless files can be created in it."""
    directory = directory or "."
    if not os.path.isdir(directory):
        raise OutputError(f"{directory}: no such directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"{directory}: cannot write: permission denied")


@contextlib.contextmanager
def atomic_dir(dest: str, replace: bool = True, merge: bool = False) -> Iterator[str]:
    """Yield a staging folder ``<dest>.partial``; on success it becomes ``dest``.

    With ``replace`` an existing ``dest`` (a folder) is replaced as a whole; otherwise an existing
    ``dest`` is an :class:`OutputError`. With ``merge`` an existing ``dest`` is kept and the staged
    entries are moved into it one by one (each replacing its namesake) once all are written. On any
    exception the staging folder is removed and ``dest`` is left as it was.
    """
    dest = os.path.abspath(dest).rstrip(os.sep)
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise OutputError(f"{dest}: exists and is not a directory")
    if os.path.exists(dest) and not replace:
        raise OutputError(f"{dest}: exists (refusing to overwrite it)")
    check_writable_dir(os.path.dirname(dest))
    stage = dest + ".partial"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        os.makedirs(stage)
    except OSError as e:
        raise OutputError(_say(dest, e)) from None
    try:
        yield stage
        old = None
        if merge and os.path.isdir(dest):
            for name in os.listdir(stage):
                target = os.path.join(dest, name)
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                os.replace(os.path.join(stage, name), target)
            os.rmdir(stage)
        elif os.path.isdir(dest):
            old = dest + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(stage, dest)
        else:
            os.replace(stage, dest)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, OutputError):  # a file inside the stage: name it where it was going
            raise OutputError(str(e).replace(stage + os.sep, dest + os.sep)) from None
        raise OutputError(_say(dest, e)) from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_path(dest: str, suffix: str = "") -> Iterator[str]:
    """Yield the path ``<dest>.partial<suffix>`` for a writer that takes a file name (``savefig``,
    ``save_checkpoint``, ``copyfile``); on success it is renamed to ``dest``, on error removed."""
    dest = os.path.abspath(dest)
    if os.path.isdir(dest):
        raise OutputError(f"{dest}: is a directory (expected a file name)")
    check_writable_dir(os.path.dirname(dest))
    tmp = dest + ".partial" + suffix
    try:
        yield tmp
        os.replace(tmp, dest)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OutputError):
            raise
        raise OutputError(_say(dest, e)) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(dest: str, mode: str = "w", **kw) -> Iterator:
    """Open ``<dest>.partial`` for writing; on success it is renamed to ``dest``, on error removed."""
    with atomic_path(dest) as tmp:
        try:
            f = open(tmp, mode, **kw)
        except OSError as e:
            raise OutputError(_say(os.path.abspath(dest), e)) from None
        with f:
            yield f


def atomic_write_text(dest: str, text: str, encoding: str = "utf-8") -> str:
    """Write ``text`` to ``dest`` through :func:`atomic_file`; return ``dest``."""
    with atomic_file(dest, "w", encoding=encoding) as f:
        f.write(text)
    return dest


@contextlib.contextmanager
def atomic_files(*dests: str) -> Iterator[list]:
    """Yield a staging path (``<dest>.pair-partial``) for each of ``dests``; when the block completes, move
    them all into place; on any error (in the block or while moving) none of ``dests`` is changed.

    Every file is written in full before any is moved, so a full disk or a failed write stops the group
    before it touches a destination; the moves themselves are renames in the same folders, and one that fails
    puts back what the earlier ones replaced.
    """
    dests = [os.path.abspath(d) for d in dests]
    for d in dests:
        if os.path.isdir(d):
            raise OutputError(f"{d}: is a directory (expected a file name)")
        check_writable_dir(os.path.dirname(d))
    stages = [d + ".pair-partial" for d in dests]

    def clean(paths):
        for p in paths:
            with contextlib.suppress(OSError):
                os.remove(p)

    try:
        yield list(stages)
        for d, s in zip(dests, stages):
            if not os.path.isfile(s):
                raise OutputError(f"{d}: was not written")
        moved, kept = [], []   # destinations now holding the new file; (dest, backup of the old one)
        try:
            for d, s in zip(dests, stages):
                if os.path.exists(d):
                    os.replace(d, d + ".pair-old")
                    kept.append((d, d + ".pair-old"))
                os.replace(s, d)
                moved.append(d)
        except OSError as e:
            clean(moved)
            for d, b in kept:
                with contextlib.suppress(OSError):
                    os.replace(b, d)
            raise OutputError(_say(d, e)) from None
        clean(b for _, b in kept)
    except OSError as e:
        clean(stages)
        if isinstance(e, OutputError):
            raise
        raise OutputError(_say(dests[0], e)) from None
    except BaseException:
        clean(stages)
        raise
