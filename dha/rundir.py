"""The resumable run directory: what every training run keeps in its --out (`dha train`,
`dha convert --tokens N` after a baseline, `dha convert --method dha`), with one set of rules.

- `run.json` names the run: {"format", "run": {source, data, ...}, "config": {...}, ...}. A resume
  must name the same run (`differences`): settings are compared one by one, except those a resume
  may change (how it reports and checkpoints, where it runs), and a setting added since a run was
  written counts as the value it had then.
- --out (`check`): missing (and creatable), or empty (dha.atomic.is_empty), starts a run; a directory holding this
  run's run.json is continued with --resume (`resume_path` says which --resume paths name it);
  anything else is refused, before any work.
- One run at a time (`hold`): rank 0 locks the directory (its .lock) for the whole run and clears
  what a killed writer left; a run that started in an empty directory and fails on bad input
  (UserError) leaves it as it found it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

from .atomic import check_out, is_empty, remove_leftovers, run_lock
from .errors import UserError

RUN_JSON = "run.json"


def read(path: str) -> dict:
    """A run directory's run.json; UserError if it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable ({e}): use a new --out") from None


def differences(old: dict, new: dict, resumable=frozenset(), added: dict | None = None) -> list[str]:
    """The names ("format", "config.lr", "run.data", ...) in which two run identities differ. The
    parts that are dicts are compared key by key: names in `resumable` are skipped, and a key one
    side lacks counts as its value in `added` (a setting added after that run was written)."""
    added = added or {}
    names = []
    for part in sorted(set(old) | set(new)):
        a, b = old.get(part), new.get(part)
        if not (isinstance(a, dict) and isinstance(b, dict)):
            names += [part] if a != b else []
            continue
        for key in sorted(set(a) | set(b)):
            name = f"{part}.{key}"
            if name not in resumable and a.get(key, added.get(name)) != b.get(key, added.get(name)):
                names.append(name)
    return names


def check(
    out: str,
    identity: dict,
    resume: bool,
    *,
    resumable=frozenset(),
    added: dict | None = None,
    finished: str | None = None,
) -> bool:
    """Whether --out holds a run to continue (read-only). A new run needs --out missing or empty;
    --resume needs it to hold this run's run.json, unfinished (`finished`: the file only a finished
    run holds). A run killed before it wrote run.json starts anew in its empty directory."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"output {out} exists and is not a directory")
    if resume and not os.path.exists(out):
        raise UserError(f"--resume {out}: no such run directory")
    if is_empty(out):
        check_out(out)  # it can be created
        return False
    run_path = os.path.join(out, RUN_JSON)
    if not os.path.isfile(run_path):
        raise UserError(f"output {out} is not empty and holds no dha run ({RUN_JSON}): use a new --out")
    old = read(run_path)
    if old.get("format") != identity["format"]:
        raise UserError(
            f"output {out} holds a run of another kind ({old.get('format')}, not {identity['format']}): use a new --out"
        )
    diffs = differences(old, identity, resumable, added)
    if diffs:
        raise UserError(f"output {out} holds a different run (differs in {', '.join(diffs)}): use a new --out")
    if finished is not None and os.path.exists(os.path.join(out, finished)):
        raise UserError(f"output {out} holds a finished run: use a new --out")
    if not resume:
        raise UserError(f"output {out} already holds this run: pass --resume {out} to continue it, or use a new --out")
    return True


def resume_path(out: str | None, resume: str | None) -> str | None:
    """The run directory --resume continues: a run resumes in its own directory, so --resume is
    --out (given or not) or a path inside it (its checkpoints/, a checkpoint). Returns --out."""
    if resume is None:
        return out
    if out is None:
        a_file = os.path.exists(resume) and not os.path.isdir(resume)
        if a_file or os.path.basename(resume.rstrip("/")) == "checkpoints":
            raise UserError(f"--resume {resume}: give the run's directory, or --out DIR with a checkpoint inside it")
        return resume
    o, r = os.path.abspath(out), os.path.abspath(resume)
    if os.path.commonpath([o, r]) != o:
        raise UserError(f"--resume {resume}: a run resumes in its own directory, --out {out}")
    return out


@contextlib.contextmanager
def hold(out: str, main: bool | None = None):
    """Hold `out` for one run on rank 0 (`main`; None: RANK 0 or no torchrun): its lock for the whole
    run (UserError if another run holds it) and no leftovers of a killed writer. A UserError inside
    a run that found `out` missing or empty leaves it so (other ranks: nothing)."""
    if main is None:
        main = int(os.environ.get("RANK", "0")) == 0
    if not main:
        yield
        return
    if not is_empty(out) and not os.path.isfile(os.path.join(out, RUN_JSON)):  # no lock file in a stranger's directory
        raise UserError(f"output {out} is not empty and holds no dha run ({RUN_JSON}): use a new --out")
    created, empty = not os.path.exists(out), is_empty(out)
    with run_lock(out):
        try:
            remove_leftovers(out)
            yield
        except UserError:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            elif empty:
                _empty(out)
            raise


def _empty(path: str) -> None:
    for name in os.listdir(path):
        if name != ".lock":
            p = os.path.join(path, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
