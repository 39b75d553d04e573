"""Writing outputs so that a reader (or a killed run) never sees half of one.

Every file and directory dha writes goes through here: a temp name beside the target, then a
rename, which POSIX makes atomic within one filesystem. A failure removes the temp and leaves the
target as it was. `run_lock` keeps two runs out of one output directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile

from .errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str, replace: bool = True):
    """Yield a temp path beside `path`; on success it becomes `path` (replace=False: never over an
    existing file, UserError), on an exception it is removed."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    try:
        fd, tmp = tempfile.mkstemp(
            dir=directory, prefix=f".{os.path.basename(path)}.tmp-", suffix=os.path.splitext(path)[1]
        )
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; outputs are ordinary files
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path exists, unlike rename
            except FileExistsError:
                raise UserError(f"output {path} already exists (use a new --out)") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str, obj) -> None:
    """JSON (indented, one trailing newline) written atomically."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")


@contextlib.contextmanager
def atomic_dir(path: str, overwrite: bool = False):
    """Yield a temp directory beside `path`; on success rename it to `path`, else remove it.

    Without `overwrite`, an existing non-empty `path` is refused before and after the work: one
    that another process made meanwhile is left alone (UserError), never swapped out from under it."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        if not os.path.isdir(path) or os.listdir(path):
            raise UserError(f"output {path} already exists and is not empty (use a new --out)")
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
    except OSError as e:
        raise UserError(f"output {path} cannot be created: {e.strerror or e}") from e
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700); the output is an ordinary directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path) and not overwrite:
        try:
            os.rmdir(path)  # an empty directory (the user's, or made meanwhile) gives way; anything else stays
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(
                f"output {path} appeared while it was being written (another process?); it was left as it is"
            ) from None
    if os.path.exists(path):
        old = tmp + ".old"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def files_into(directory: str, last: str):
    """Yield a temp directory inside `directory`; on success move each file of it into `directory`
    by rename, `last` after all others (a reader that finds `last` finds the rest)."""
    tmp = tempfile.mkdtemp(dir=directory, prefix=".final-")
    try:
        yield tmp
        for name in sorted(os.listdir(tmp), key=lambda n: n == last):
            target = os.path.join(directory, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _leftover(name: str) -> bool:
    """A name only dha's writers give (hidden: `.final-*`, `.NAME.tmp-*`), never a user's file."""
    return name.startswith(".") and (name.startswith(".final-") or ".tmp-" in name)


def is_empty(path: str) -> bool:
    """Whether the directory `path` is missing or holds nothing but its run lock (.lock) and what a
    killed writer left: the one meaning of an empty output directory."""
    if not os.path.exists(path):
        return True
    try:
        return os.path.isdir(path) and not [n for n in os.listdir(path) if n != ".lock" and not _leftover(n)]
    except OSError as e:
        raise UserError(f"output {path} cannot be read: {e.strerror or e}") from None


def check_out(path: str) -> None:
    """Refuse an --out that exists and is not an empty directory (`is_empty`), or that cannot be
    created, before any slow work."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if os.path.exists(os.path.join(path, "run.json")):
            raise UserError(f"output {path} holds a training run: continue it with --resume {path}, or use a new --out")
        if not is_empty(path):
            raise UserError(f"output {path} already exists and is not empty (use a new --out)")
        return
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UserError(f"output {path} cannot be created: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"output {path} cannot be created: no permission to write in {ancestor}")


def remove_leftovers(directory: str) -> None:
    """Remove the temp files and directories a killed writer left in `directory`."""
    for name in os.listdir(directory):
        if _leftover(name):
            p = os.path.join(directory, name)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)


@contextlib.contextmanager
def run_lock(directory: str):
    """Hold an exclusive lock on `directory` (its .lock file) for a run; UserError if another
    process holds it. The lock goes with the process, however it ends."""
    os.makedirs(directory, exist_ok=True)
    f = open(os.path.join(directory, ".lock"), "a")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise UserError(
                    f"output {directory} is in use by another dha run: wait for it, or use a new --out"
                ) from None
            raise
        yield
    finally:
        f.close()
