"""The directory protocol that makes saves atomic and recovery depend only on what is complete.

A checkpoint directory holds one sub-directory (a *copy*) per step, plus transient ones::

    directory/
      10/                      step 10
      .staging-20-<hex>/       a save of step 20, complete once it holds its commit marker
      .trash-<hex>/            being deleted; never read

Commit marker. A copy is complete iff it holds ``COMMITTED``: a JSON object ``{"format", "step",
"generation", "manifest_sha256"}`` written after every other file of the copy has been written and
flushed, first to ``COMMITTED.tmp`` and then renamed. A rename is atomic, so a marker never exists
before the files it vouches for: its rename is the save's commit point.

Generations. A save of step ``s`` gets generation ``1 + max`` over the complete copies of ``s`` (1 if
there are none). Where a crash leaves several complete copies of a step (between the commit point and
the final rename), readers take the largest generation, i.e. the last committed save. Names,
modification times and the order of directory entries play no part.

Deletion. A copy is deleted by renaming it to ``.trash-<hex>`` first and removing its files after, so
a partly deleted copy is never under a name that readers look at.

Settling. :func:`settle`, which every save runs before writing and after committing, gives each step
its winning copy under the name ``<step>`` (renaming whatever held that name to the trash first),
moves every other copy of the step and every incomplete staging copy to the trash, and empties the
trash. Each rename leaves the winner complete under a name that readers look at, so a process killed
at any point of a save or of a settle (twice in a row, or more) leaves every step with its last
committed save; the next save finishes the tidying. One writer per directory: a settle treats every
incomplete staging copy as left over from a killed process.

Several processes. In a multi-process save only process 0 runs :func:`begin`, :func:`commit` and
:func:`settle`; every process writes its array shards into the staging copy in between
(:func:`unlearn_jax.checkpoint.save_checkpoint`). So the directory still has one writer of names.

This module uses the standard library only, so that its kill tests can load it alone and fork cheap
processes to kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

MARKER = "COMMITTED"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
_STEP_RE = re.compile(r"^\d+$")
_STAGING_RE = re.compile(r"^\.staging-(\d+)-[0-9a-f]+$")


class Copy(NamedTuple):
    """A complete copy of a step: its directory, step, generation and commit marker."""

    path: pathlib.Path
    step: int
    generation: int
    marker: dict[str, Any]


def write_file(path: pathlib.Path, data: bytes) -> None:
    """Writes a new file and flushes it to disk (``O_EXCL``: never over an existing file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: pathlib.Path) -> None:
    """Flushes a directory's entries (renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_marker(copy_dir: pathlib.Path, marker: dict[str, Any]) -> None:
    """Commits a copy: writes its marker to a temporary name, flushes it, renames it into place."""
    tmp = copy_dir / f"{MARKER}.tmp"
    write_file(tmp, json.dumps(marker, sort_keys=True).encode())
    os.rename(tmp, copy_dir / MARKER)
    fsync_dir(copy_dir)


def read_marker(copy_dir: pathlib.Path, fmt: str) -> dict[str, Any] | None:
    """The commit marker of a copy, or ``None`` if it has none (or one that does not parse)."""
    try:
        marker = json.loads((copy_dir / MARKER).read_bytes())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(marker, dict)
        or marker.get("format") != fmt
        or not isinstance(marker.get("step"), int)
        or not isinstance(marker.get("generation"), int)
        or not isinstance(marker.get("manifest_sha256"), str)
    ):
        return None
    return marker


def scan(root: pathlib.Path, fmt: str) -> tuple[dict[int, list[Copy]], list[pathlib.Path]]:
    """The complete copies of each step, and the incomplete ones (staging or final)."""
    complete: dict[int, list[Copy]] = {}
    incomplete: list[pathlib.Path] = []
    if not root.is_dir():
        return complete, incomplete
    for entry in root.iterdir():
        if _STEP_RE.match(entry.name):
            step = int(entry.name)
        elif m := _STAGING_RE.match(entry.name):
            step = int(m.group(1))
        else:
            continue
        marker = read_marker(entry, fmt) if entry.is_dir() else None
        if marker is None or marker["step"] != step:
            incomplete.append(entry)
        else:
            complete.setdefault(step, []).append(Copy(entry, step, marker["generation"], marker))
    return complete, incomplete


def best(copies: list[Copy]) -> Copy:
    """The copy readers use: the largest generation (a tie, possible only with two writers, goes to
    the final name, then to the larger name)."""
    return max(
        copies,
        key=lambda c: (c.generation, _STEP_RE.match(c.path.name) is not None, c.path.name),
    )


def winners(root: pathlib.Path, fmt: str) -> dict[int, Copy]:
    """Step -> the copy readers use: the complete copy with the largest generation."""
    complete, _ = scan(root, fmt)
    return {step: best(copies) for step, copies in complete.items()}


def next_generation(root: pathlib.Path, fmt: str, step: int) -> int:
    """The generation of a new save of ``step``: one more than any complete copy's."""
    complete, _ = scan(root, fmt)
    return 1 + max((c.generation for c in complete.get(step, [])), default=0)


def trash(root: pathlib.Path, path: pathlib.Path) -> None:
    """Moves ``path`` out of the readers' sight (one atomic rename); :func:`empty_trash` deletes it."""
    os.rename(path, root / f"{TRASH_PREFIX}{uuid.uuid4().hex}")


def empty_trash(root: pathlib.Path) -> None:
    """Deletes everything moved to the trash (what fails to go stays there for the next time)."""
    for entry in root.iterdir():
        if entry.name.startswith(TRASH_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry)


def discard(root: pathlib.Path, path: pathlib.Path) -> None:
    """Trashes and deletes an uncommitted copy (a save that failed before its commit point)."""
    with contextlib.suppress(OSError):
        if path.exists():
            trash(root, path)
    with contextlib.suppress(OSError):
        empty_trash(root)


def settle(root: pathlib.Path, fmt: str) -> None:
    """Gives each step its winning copy under its final name and deletes everything else.

    See the module docstring; safe to interrupt at any point (the next call carries on). A final-name
    directory without a marker is left alone unless a complete copy of its step exists elsewhere (it
    may be a checkpoint of an older format, or damaged: not ours to delete).
    """
    if not root.is_dir():
        return
    complete, incomplete = scan(root, fmt)
    for step, copies in complete.items():
        winner = best(copies)
        final = root / str(step)
        if winner.path != final:
            if final.exists() or final.is_symlink():
                trash(root, final)
            os.rename(winner.path, final)
            fsync_dir(root)
        for copy in copies:
            if copy.path not in (winner.path, final):
                trash(root, copy.path)
    for path in incomplete:
        if path.name.startswith(STAGING_PREFIX):
            trash(root, path)
    empty_trash(root)


def begin(root: pathlib.Path, step: int, fmt: str, *, overwrite: bool) -> tuple[pathlib.Path, int]:
    """The first phase of a save: tidies ``root`` and creates an empty staging copy of ``step``.

    Args:
      root: the checkpoint directory (created if missing).
      step: the step.
      fmt: the format string the marker carries.
      overwrite: replace a complete copy of ``step``.

    Returns:
      ``(staging, generation)``: the new staging directory and the generation its marker will carry.

    Raises:
      FileExistsError: ``root/<step>`` exists (complete or not) and ``overwrite`` is False.
      NotADirectoryError: ``root`` is a file.
    """
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"checkpoint directory {root} is a file; expected a directory.")
    root.mkdir(parents=True, exist_ok=True)
    # Finish what a killed save left (a committed copy not yet renamed, staging copies, trash).
    settle(root, fmt)
    final = root / str(step)
    if (final.exists() or step in winners(root, fmt)) and not overwrite:
        raise FileExistsError(
            f"a checkpoint already exists at {final}; pass overwrite=True to replace it (atomically) "
            "or save under another step."
        )
    generation = next_generation(root, fmt, step)
    staging = root / f"{STAGING_PREFIX}{step}-{uuid.uuid4().hex}"
    os.mkdir(staging)
    return staging, generation


def commit(
    staging: pathlib.Path, fmt: str, step: int, generation: int, manifest_sha256: str
) -> None:
    """The commit point of a save: writes the marker of a staging copy whose files are all written
    and flushed. From its rename on, the copy is the one readers find; :func:`settle` moves it to
    its final name."""
    marker = {
        "format": fmt,
        "step": step,
        "generation": generation,
        "manifest_sha256": manifest_sha256,
    }
    write_marker(staging, marker)


def save(
    root: pathlib.Path,
    step: int,
    fmt: str,
    write: Callable[[pathlib.Path, int], str],
    *,
    overwrite: bool,
) -> pathlib.Path:
    """Saves one copy of ``step`` under the protocol above and returns ``root/<step>``.

    The three phases :func:`begin`, ``write`` and :func:`commit`, then :func:`settle`, in one
    process. (A multi-process save runs the same phases with the writes of every process between
    :func:`begin` and :func:`commit`: :func:`unlearn_jax.checkpoint.save_checkpoint`.)

    Args:
      root: the checkpoint directory (created if missing).
      step: the step.
      fmt: the format string the marker carries.
      write: ``write(staging_dir, generation) -> manifest_sha256`` writes every file of the copy into
        the (existing, empty) staging directory, flushed to disk, and returns the SHA-256 the marker
        records.
      overwrite: replace a complete copy of ``step``.

    Raises:
      FileExistsError: ``root/<step>`` exists (complete or not) and ``overwrite`` is False.
      NotADirectoryError: ``root`` is a file.
      Whatever ``write`` raises; the staging copy is deleted then. An error after the commit point
      (the marker's rename) leaves the new copy committed; the next save finishes moving it.
    """
    staging, generation = begin(root, step, fmt, overwrite=overwrite)
    committed = False
    try:
        manifest_sha256 = write(staging, generation)
        commit(staging, fmt, step, generation, manifest_sha256)
        committed = True
    except BaseException:
        if not committed:
            discard(root, staging)
        raise
    settle(root, fmt)
    return root / str(step)
