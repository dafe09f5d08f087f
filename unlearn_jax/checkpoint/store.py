"""Orbax checkpoints of a ``TrainState`` with JSON metadata and a deletion ledger, saved atomically,
verified whole before use, sharded over any number of processes.

Layout. A checkpoint *directory* holds one sub-directory per saved step::

    directory/
      10/
        state/            the arrays (an orbax PyTree checkpoint of params, opt_state and step; in a
                          multi-process run each process writes its own shards, OCDBT/tensorstore)
        metadata.json     the caller's JSON dict (model config, data set, optimizer, ...)
        ledger.json       the deletion ledger (:class:`~unlearn_jax.checkpoint.ledger.Ledger`)
        manifest.json     for every array leaf: path, shape, dtype, the SHA-256 of each block of
                          2**20 elements and the leaf digest over them; for every file above: size
                          and SHA-256; the checkpoint's digest and generation
        COMMITTED         the commit marker, written last; holds the SHA-256 of manifest.json
      .staging-20-<hex>/  a save in progress (complete once it holds COMMITTED)
      .trash-<hex>/       a copy being deleted

Atomicity and recovery (:mod:`unlearn_jax.checkpoint._layout`). A save writes a staging copy, commits
it by renaming its marker into place, then renames it to ``directory/<step>`` (an overwritten copy is
renamed to the trash first, and deleted after). A copy without a marker is ignored; among complete
copies of a step, readers take the one with the largest generation (the last committed save), never
the newest by modification time. A process killed at any point of a save or of the cleanup that
follows it, once or several times in a row, leaves each step with its last committed save and every
other step untouched; the next save removes unfinished staging copies and the trash.

Array digests (:mod:`unlearn_jax.checkpoint._digest`). Each leaf is cut into blocks of ``2**20``
consecutive C-order elements; a block's SHA-256 is computed by the process that holds it (a sharded
array is first laid out block by block over its own devices, device to device), and the leaf digest
is the SHA-256 of its block digests. No array is gathered on one host, and the digests, hence
:func:`checkpoint_digest` and the ledger's ``before``/``after``, are the same for a model saved by
one process or by many, under any sharding.

Several processes (``jax.distributed.initialize``). :func:`save_checkpoint`,
:func:`restore_checkpoint`, :func:`verify_checkpoint` and :func:`checkpoint_digest` are collectives:
every process calls them with the same arguments, and they return (or raise the same error) on every
process. The directory must be one file system that every process sees (as orbax requires). A save
runs in phases, each ending in an exchange that doubles as a barrier (an all-gather over every
device, :mod:`unlearn_jax.checkpoint._multihost`):

1. process 0: tidy the directory, create the staging copy, pick its generation; broadcast its name
   (or the error, e.g. ``FileExistsError``, which every process then raises);
2. all: hash the blocks they hold; all-gather the digests (every process gets every digest);
3. all: orbax writes each process's shards into ``staging/state`` (orbax's own barriers); all-gather
   "did anyone fail";
4. all: hash (and flush) the files of ``state/``, split among processes by size; all-gather;
5. process 0: write metadata, ledger and manifest, then the commit marker (the commit point), then
   move the copy to its final name and empty the trash; broadcast success or the error.

Only process 0 creates, renames or deletes anything outside ``state/``; the others wait for its
broadcast. A failure before the commit point removes the staging copy (process 0) and raises on
every process. Reading is the mirror image: process 0 resolves the step and broadcasts its path,
every process checks the JSON files, the files of ``state/`` are checked in shares, orbax restores
each process's shards onto the target's shardings, and each process checks the blocks it holds;
the first mismatch (in the single-process order: files by path, then leaves, then blocks) is raised
everywhere. A process killed mid-save leaves the others waiting in the next exchange until the
distributed runtime notices; what is on disk is then as after any killed save.

Verification. Nothing is used before it checks out, in this order: the marker, ``manifest.json``
against the marker's SHA-256, ``metadata.json`` and ``ledger.json`` against the manifest, the
ledger's hash chain, every file of ``state/`` against the manifest (so a truncated or missing file is
named before orbax reads it), and, on restore, every block of every array against its SHA-256. A
failure raises :class:`CheckpointVerificationError` naming the first mismatch.
:func:`verify_checkpoint` runs every check without a target state and reports the checkpoint's
digest and ledger.

What verification proves. The hashes detect corruption and edits by anything that does not recompute
them; whoever can write the directory can recompute them all. Anchor the ledger (publish a record's
hash, pass it back as ``anchor=``) to detect a rewritten ledger. One writer per directory:
concurrent saves to the same directory are not supported.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from unlearn_jax.checkpoint import _digest as digests
from unlearn_jax.checkpoint import _layout, _multihost
from unlearn_jax.checkpoint.ledger import (
    Ledger,
    LedgerError,
    canonical_json,
    json_safe,
    sha256_hex,
)

FORMAT = "unlearn_jax.checkpoint/3"
DIGEST_FORMAT = "unlearn_jax.checkpoint-digest/2"
BLOCK_ELEMENTS = digests.BLOCK_ELEMENTS
STATE_DIR = "state"
METADATA_FILE = "metadata.json"
LEDGER_FILE = "ledger.json"
MANIFEST_FILE = "manifest.json"
_READ_ATTEMPTS = 3  # a copy renamed by a concurrent save while being read is looked up again


class CheckpointError(Exception):
    """Base class of the errors raised when a checkpoint cannot be read, and of a failure met by
    another process of a multi-process call (the message names the process)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No (complete) checkpoint at the given directory or step."""


class CheckpointCorruptedError(CheckpointError):
    """A checkpoint exists but its files are unreadable or do not match their recorded hashes."""


class CheckpointVerificationError(CheckpointCorruptedError):
    """A checkpoint that does not verify; the message names the first mismatch.

    Attributes:
      path: the checkpoint's step directory.
      item: what failed: ``"COMMITTED"``, ``"manifest.json"``, ``"metadata.json"``,
        ``"ledger.json"``, a file of ``state/`` (its path relative to ``path``), or
        ``"array <leaf path>"``.
    """

    def __init__(self, message: str, path: pathlib.Path, item: str):
        super().__init__(message)
        self.path = path
        self.item = item


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint is intact but its tree differs from the target's (paths, shapes or dtypes)."""


class _CopyMoved(Exception):
    """The copy being read was renamed away (by a concurrent save's cleanup): look it up again."""


# ---- agreeing between processes -------------------------------------------------------------------
# Errors crossing processes: a verification failure keeps its class, path and item; "order" ranks
# failures found by different processes as one process would have met them (files by path, then
# arrays by leaf and block), so every process raises the same first mismatch.
_REBUILT = {
    cls.__name__: cls
    for cls in (
        CheckpointError,
        CheckpointNotFoundError,
        CheckpointCorruptedError,
        CheckpointMismatchError,
        LedgerError,
        _CopyMoved,
    )
}
_BUILTIN_ERRORS = (
    "FileExistsError",
    "FileNotFoundError",
    "NotADirectoryError",
    "PermissionError",
    "OSError",
    "ValueError",
    "TypeError",
)


def _describe(error: BaseException) -> dict[str, Any]:
    return {
        "type": type(error).__name__,
        "message": str(error),
        "path": str(getattr(error, "path", "")),
        "item": getattr(error, "item", None),
        "order": list(getattr(error, "order", [])),
    }


def _rebuild(described: dict[str, Any], process: int) -> BaseException:
    kind, message = described["type"], described["message"]
    if kind == CheckpointVerificationError.__name__:
        return CheckpointVerificationError(
            message, pathlib.Path(described["path"]), described["item"]
        )
    if kind in _REBUILT:
        return _REBUILT[kind](message)
    if kind in _BUILTIN_ERRORS:
        return getattr(builtins, kind)(message)
    return CheckpointError(f"process {process} failed: {kind}: {message}")


def _agree(error: BaseException | None) -> None:
    """Raises, on every process, the first error any process met (a collective; local when alone).

    The first: the smallest ``order`` (errors without one come first), then the lowest process. The
    process that met it raises the original exception; the others a copy of the same class.
    """
    if _multihost.process_count() == 1:
        if error is not None:
            raise error
        return
    if not any(_multihost.gather_flags(error is not None)):
        return
    described = _multihost.allgather_json(None if error is None else _describe(error))
    process, first = min(
        ((p, d) for p, d in enumerate(described) if d is not None),
        key=lambda pd: (pd[1]["order"], pd[0]),
    )
    if process == _multihost.process_index() and error is not None:
        raise error
    raise _rebuild(first, process)


@contextlib.contextmanager
def _together() -> Iterator[None]:
    """Runs a phase on every process and ends it in agreement: all succeed, or all raise the first
    error (see :func:`_agree`). The exchange is the phase's barrier."""
    try:
        yield
    except Exception as error:  # re-raised on every process by _agree
        _agree(error)
        raise
    _agree(None)


def _on_primary(fn: Callable[[], Any]) -> Any:
    """``fn()`` on process 0 only; its JSON-safe result (or its error) on every process."""
    if _multihost.process_count() == 1:
        return fn()
    outcome: dict[str, Any] = {}
    error = None
    if _multihost.is_primary():
        try:
            outcome = {"ok": fn()}
        except Exception as err:  # re-raised below, and rebuilt on the others
            error = err
            outcome = {"error": _describe(err)}
    outcome = _multihost.broadcast_json(outcome)
    if error is not None:
        raise error
    if "error" in outcome:
        raise _rebuild(outcome["error"], 0)
    return outcome["ok"]


# ---- trees <-> flat manifests ---------------------------------------------------------------------
def _host_scalar(value: Any, name: str) -> np.ndarray:
    """A small value (the step counter) on the host, also from a replicated multi-process array."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        if not value.sharding.is_fully_replicated:
            raise ValueError(
                f"{name} must be replicated over its devices to be saved, got sharding "
                f"{value.sharding}."
            )
        value = value.addressable_shards[0].data
    return np.asarray(value)


def _state_dict(state: Any, *, for_saving: bool = True) -> dict[str, Any]:
    """``{"params", "opt_state", "step"}`` of a TrainState as nested dicts (the saved tree)."""
    for field in ("params", "opt_state", "step"):
        if not hasattr(state, field):
            raise TypeError(
                f"expected a flax TrainState (with params, opt_state, step), got {type(state).__name__}."
            )
    step = state.step
    if for_saving:
        # Any integer dtype (a Python int, int32 from jit, int64 with x64) is the same counter.
        step = _host_scalar(step, "state.step").astype(np.int64)
    return {
        "params": serialization.to_state_dict(state.params),
        "opt_state": serialization.to_state_dict(state.opt_state),
        "step": step,
    }


def _path_str(path: tuple) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _flat(tree: Any) -> dict[str, Any]:
    return {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _digest(leaves: dict[str, Any], metadata: Any) -> str:
    summary = {
        path: {"shape": info["shape"], "dtype": info["dtype"], "sha256": info["sha256"]}
        for path, info in leaves.items()
    }
    return sha256_hex(
        canonical_json({"format": DIGEST_FORMAT, "leaves": summary, "metadata": metadata})
    )


def checkpoint_digest(state: Any, metadata: dict[str, Any]) -> str:
    """The digest of a model as a checkpoint stores it: its arrays and its metadata.

    ``SHA-256(canonical_json({"format": DIGEST_FORMAT, "leaves": {path: {"shape", "dtype",
    "sha256"}}, "metadata": metadata}))`` over the leaves of ``params``, ``opt_state`` and ``step``,
    where a leaf's ``sha256`` is ``SHA-256(b_0 || ... || b_{m-1})`` and ``b_j`` the SHA-256 of its
    ``j``-th block of ``2**20`` C-order elements (:mod:`unlearn_jax.checkpoint._digest`). It does not
    depend on where, how often or by how many processes the state is saved, nor on its sharding, so
    a :class:`~unlearn_jax.checkpoint.ledger.Ledger` record's ``before``/``after`` digests identify
    models, and :func:`verify_checkpoint` reports the saved model's.

    Args:
      state: a flax ``TrainState``; sharded arrays are hashed block by block where they live (no
        array is gathered on one host).
      metadata: the JSON-safe metadata dict saved with it.

    Returns:
      64 lowercase hex digits.

    Raises:
      TypeError: for metadata that is not a JSON-safe dict.

    In a multi-process run this is a collective: every process calls it with the same arguments.
    """
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}.")
    meta = _metadata_json(metadata)
    return _digest(digests.leaf_infos(_flat(_state_dict(state))), meta)


def _metadata_json(metadata: dict[str, Any]) -> Any:
    try:
        return json_safe(metadata, "")
    except TypeError as err:
        raise TypeError(f"metadata: {err}") from None


# ---- directory layout -----------------------------------------------------------------------------
def _root(directory: Any) -> pathlib.Path:
    return pathlib.Path(os.path.abspath(os.fspath(directory)))


def list_steps(directory: Any) -> list[int]:
    """The steps with a complete checkpoint in ``directory``, ascending (``[]`` if none or missing)."""
    return sorted(_layout.winners(_root(directory), FORMAT))


def latest_step(directory: Any) -> int | None:
    """The largest step with a complete checkpoint in ``directory``, or ``None``."""
    steps = list_steps(directory)
    return steps[-1] if steps else None


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler())


def _write_state(path: pathlib.Path, tree: Any) -> None:
    with _checkpointer() as ckptr:
        ckptr.save(path, args=ocp.args.PyTreeSave(tree))


def _savable(leaf: Any) -> Any:
    """What orbax writes: a global jax.Array as it is (each process writes its shards); host values,
    and in a multi-process run arrays local to one process, as numpy (written by process 0)."""
    if isinstance(leaf, jax.Array) and not (
        _multihost.process_count() > 1 and leaf.is_fully_addressable
    ):
        return leaf
    return np.asarray(leaf)


def _hash_file(path: pathlib.Path) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file, flushed to disk on the way."""
    fd = os.open(path, os.O_RDONLY)
    try:
        h, size = hashlib.sha256(), 0
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
            size += len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"size": size, "sha256": h.hexdigest()}


def _list_files(copy_dir: pathlib.Path, sub: str) -> dict[str, int]:
    """``{path relative to copy_dir: size}`` of every file under ``copy_dir/sub``; flushes the
    directories."""
    files = {}
    for dirpath, _, names in os.walk(copy_dir / sub):
        for name in names:
            path = pathlib.Path(dirpath) / name
            files[path.relative_to(copy_dir).as_posix()] = path.stat().st_size
        _layout.fsync_dir(pathlib.Path(dirpath))
    return files


def _hash_state_files(copy_dir: pathlib.Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file of ``state/``, each hashed (and flushed)
    by one process: process 0 lists them, each process hashes its share by size (collective)."""
    count = _multihost.process_count()
    sizes = _on_primary(lambda: _list_files(copy_dir, STATE_DIR))
    mine = _multihost.assign(sizes, count)[_multihost.process_index()]
    with _together():
        hashed = {rel: _hash_file(copy_dir / rel) for rel in mine}
    files: dict[str, dict[str, Any]] = {}
    for part in _multihost.allgather_json(hashed) if count > 1 else [hashed]:
        files.update(part)
    return files


# ---- save -------------------------------------------------------------------------------------------
def save_checkpoint(
    directory: Any,
    state: Any,
    metadata: dict[str, Any],
    *,
    step: int | None = None,
    overwrite: bool = False,
    ledger: Ledger | None = None,
) -> pathlib.Path:
    """Saves ``state`` (params, opt_state, step), ``metadata`` and a ledger as ``directory/<step>``.

    Sharded arrays are written shard by shard by the processes that hold them (orbax, OCDBT) and
    hashed block by block where they live: no array is gathered on one host. In a multi-process run
    this is a collective (every process calls it with the same arguments; process 0's ``metadata``
    and ``ledger`` are the ones written); see the module docstring for the phases and barriers.

    Args:
      directory: the checkpoint directory (created if missing); several steps may live in it.
      state: a flax ``TrainState`` (a stacked one from ``fit_many`` too), its leaves numpy arrays or
        ``jax.Array``s of any sharding.
      metadata: a JSON-serialisable dict (string keys; numpy/JAX scalars and arrays are converted
        to numbers and lists), e.g. ``{"model": model_config(model), "data": "digits", ...}``.
      step: the step to save under; defaults to ``int(state.step)`` (required when ``state.step`` is
        not a scalar, as for stacked states).
      overwrite: replace an existing checkpoint of the same step. The replacement is atomic: the old
        checkpoint stays the one readers find until the new one is committed.
      ledger: the model's deletion ledger (default: an empty one). It must verify; its last
        record's ``checkpoint_after`` is normally ``checkpoint_digest(state, metadata)``
        (:func:`verify_checkpoint` reports whether it is).

    Returns:
      The path of the saved checkpoint, ``directory/<step>``.

    Raises:
      FileExistsError: if step ``step`` exists and ``overwrite`` is False.
      NotADirectoryError: if ``directory`` is a file.
      TypeError: if ``metadata`` is not JSON-serialisable (the message gives the offending key),
        ``state`` is not a TrainState or ``ledger`` not a Ledger.
      ValueError: for a negative or non-integer step, or a ``state.step`` sharded over devices.
      LedgerError: (a ValueError) for a ledger that does not verify.
      OSError: when the file system fails. Before the commit point nothing changes; after it, the new
        checkpoint is the one readers find and the next save finishes the cleanup.
    """
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}.")
    meta = _metadata_json(metadata)
    if ledger is None:
        ledger = Ledger()
    if not isinstance(ledger, Ledger):
        raise TypeError(
            f"ledger must be an unlearn_jax.checkpoint.Ledger, got {type(ledger).__name__}."
        )
    ledger.verify()
    tree = _state_dict(state)
    if step is None:
        if np.ndim(state.step) != 0:
            raise ValueError(
                f"state.step has shape {np.shape(state.step)} (a stacked state?); pass step= explicitly."
            )
        step = int(tree["step"])
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got step={step!r}.")
    step = int(step)

    root = _root(directory)
    # Phase 1 (process 0): tidy, create the staging copy; everyone learns its name or the error.
    staging_name, generation = _on_primary(lambda: _begin(root, step, overwrite=overwrite))
    staging = pathlib.Path(staging_name)
    committed = False
    try:
        # Phase 2 (all): every block hashed where it lives, the digests gathered everywhere.
        leaves = digests.leaf_infos(_flat(tree))
        # Phase 3 (all): orbax writes each process's shards.
        with _together():
            _write_state(staging / STATE_DIR, jax.tree_util.tree_map(_savable, tree))
        # Phase 4 (all): the files of state/, hashed in shares.
        files = _hash_state_files(staging)

        # Phase 5 (process 0): the JSON files, the manifest, the commit marker.
        def finish() -> bool:
            _layout.write_file(staging / METADATA_FILE, _pretty(meta))
            _layout.write_file(staging / LEDGER_FILE, _pretty(ledger.to_json()))
            for name in (METADATA_FILE, LEDGER_FILE):
                files[name] = _hash_file(staging / name)
            _layout.fsync_dir(staging)
            manifest = {
                "format": FORMAT,
                "step": step,
                "generation": generation,
                "block_elements": BLOCK_ELEMENTS,
                "digest": _digest(leaves, meta),
                "leaves": leaves,
                "files": files,
            }
            manifest_bytes = _pretty(manifest)
            _layout.write_file(staging / MANIFEST_FILE, manifest_bytes)
            _layout.commit(staging, FORMAT, step, generation, sha256_hex(manifest_bytes))
            return True

        committed = _on_primary(finish)
    except BaseException:
        if not committed and _multihost.is_primary():
            _layout.discard(root, staging)
        raise
    _on_primary(lambda: _layout.settle(root, FORMAT))
    return root / str(step)


def _begin(root: pathlib.Path, step: int, *, overwrite: bool) -> list[Any]:
    staging, generation = _layout.begin(root, step, FORMAT, overwrite=overwrite)
    return [str(staging), generation]


def _pretty(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, indent=1).encode() + b"\n"


# ---- reading and verifying --------------------------------------------------------------------------
class _Opened(NamedTuple):
    path: pathlib.Path
    step: int
    manifest: dict[str, Any]
    metadata: dict[str, Any]
    ledger: Ledger


def _resolve(directory: Any, step: int | None) -> tuple[pathlib.Path, int]:
    root = _root(directory)
    if not root.exists():
        raise CheckpointNotFoundError(f"no checkpoint directory at {root}.")
    if not root.is_dir():
        raise CheckpointNotFoundError(
            f"{root} is a file, not a checkpoint directory (expected a directory holding "
            "<step>/ sub-directories, as written by save_checkpoint)."
        )
    complete, incomplete = _layout.scan(root, FORMAT)
    if not complete:
        extra = ""
        if incomplete:
            names = sorted(p.name for p in incomplete)
            extra = (
                f" (without a commit marker: {names}; unfinished saves, or checkpoints of an older "
                f"format than {FORMAT!r})"
            )
        raise CheckpointNotFoundError(f"{root} holds no complete checkpoint{extra}.")
    if step is None:
        step = max(complete)
    if isinstance(step, bool) or not isinstance(step, int | np.integer):
        raise ValueError(f"step must be an integer or None, got step={step!r}.")
    if step not in complete:
        raise CheckpointNotFoundError(
            f"no checkpoint of step {step} in {root}; available steps: {sorted(complete)}."
        )
    return _layout.best(complete[int(step)]).path, int(step)


def _fail(path: pathlib.Path, item: str, what: str) -> CheckpointVerificationError:
    return CheckpointVerificationError(
        f"checkpoint {path} does not verify: {item} {what}", path, item
    )


def _read(path: pathlib.Path, name: str) -> bytes:
    try:
        return (path / name).read_bytes()
    except OSError as err:
        if not path.is_dir():
            raise _CopyMoved from None
        raise _fail(path, name, f"cannot be read ({type(err).__name__}: {err}).") from None


def _check_file(path: pathlib.Path, rel: str, info: Any, data: bytes | None = None) -> None:
    """Compares one file of a copy with its manifest entry (size, then SHA-256)."""
    if not (isinstance(info, dict) and isinstance(info.get("sha256"), str)):
        raise _fail(path, MANIFEST_FILE, f"has a malformed entry for {rel!r}.")
    if data is None:
        file = path / rel
        if not file.is_file():
            if not path.is_dir():
                raise _CopyMoved
            raise _fail(path, rel, "is missing (the manifest lists it).")
        size = file.stat().st_size
        if size != info.get("size"):
            raise _fail(path, rel, f"has {size} bytes, the manifest records {info.get('size')} "
                                   "(truncated or overwritten).")  # fmt: skip
        data = _read(path, rel)
    actual = sha256_hex(data)
    if actual != info["sha256"]:
        raise _fail(
            path,
            rel,
            f"was altered after the save: its SHA-256 is {actual}, the manifest records "
            f"{info['sha256']}.",
        )


def _parse_json(path: pathlib.Path, name: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as err:
        raise _fail(path, name, f"is not valid JSON ({err}).") from None


def _first_bad_record(ledger_bytes: bytes) -> str:
    """Which record of an altered ledger file no longer checks out, if its chain shows it."""
    try:
        Ledger.from_json(json.loads(ledger_bytes)).verify()
    except LedgerError as err:
        return f"The first record that does not check out: {err}"
    except ValueError:
        return ""
    return ""


def _open_once(path: pathlib.Path, step: int) -> _Opened:
    """Verifies a copy's marker, manifest, metadata and ledger (the small files every reader needs)."""
    marker = _layout.read_marker(path, FORMAT)
    if marker is None:
        if not path.is_dir():
            raise _CopyMoved
        raise _fail(path, _layout.MARKER, "is missing or unreadable.")
    manifest_bytes = _read(path, MANIFEST_FILE)
    actual = sha256_hex(manifest_bytes)
    if actual != marker["manifest_sha256"]:
        raise _fail(
            path,
            MANIFEST_FILE,
            f"was altered after the save: its SHA-256 is {actual}, the commit marker records "
            f"{marker['manifest_sha256']}.",
        )
    manifest = _parse_json(path, MANIFEST_FILE, manifest_bytes)
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("leaves"), dict)
        or not isinstance(manifest.get("files"), dict)
        or manifest.get("block_elements") != BLOCK_ELEMENTS
    ):
        raise _fail(path, MANIFEST_FILE, f"is not a manifest of format {FORMAT!r}.")
    files = manifest["files"]
    for name in (METADATA_FILE, LEDGER_FILE):
        if name not in files:
            raise _fail(path, MANIFEST_FILE, f"does not list {name}.")

    metadata_bytes = _read(path, METADATA_FILE)
    _check_file(path, METADATA_FILE, files[METADATA_FILE], metadata_bytes)
    metadata = _parse_json(path, METADATA_FILE, metadata_bytes)

    ledger_bytes = _read(path, LEDGER_FILE)
    try:
        _check_file(path, LEDGER_FILE, files[LEDGER_FILE], ledger_bytes)
    except CheckpointVerificationError as err:
        detail = _first_bad_record(ledger_bytes)
        if detail:
            raise CheckpointVerificationError(f"{err} {detail}", path, LEDGER_FILE) from None
        raise
    try:
        ledger = Ledger.from_json(_parse_json(path, LEDGER_FILE, ledger_bytes))
        ledger.verify()
    except LedgerError as err:
        raise _fail(path, LEDGER_FILE, f"does not verify: {err}") from None

    return _Opened(path, step, manifest, metadata, ledger)


def _check_state_files(opened: _Opened) -> None:
    """Every file of ``state/`` against the manifest, in shares by size (collective): the first
    mismatch by path, so the one a single process reading them all in order would name."""
    files = opened.manifest["files"]
    sizes = {}
    for rel, info in files.items():
        if rel not in (METADATA_FILE, LEDGER_FILE):
            size = info.get("size") if isinstance(info, dict) else None
            sizes[rel] = size if isinstance(size, int) and size >= 0 else 0
    mine = _multihost.assign(sizes, _multihost.process_count())[_multihost.process_index()]
    with _together():
        for rel in mine:
            try:
                _check_file(opened.path, rel, files[rel])
            except CheckpointVerificationError as err:
                err.order = ["file", rel]
                raise


def _open(
    directory: Any, step: int | None, *, state_files: bool, collective: bool = False
) -> _Opened:
    """Resolves and verifies a checkpoint's JSON items (and its state files if asked).

    ``collective``: every process calls this (restore, verify); process 0 resolves the step and
    broadcasts its path, so all read the same copy, and every check ends in agreement. Otherwise
    (read_metadata, read_ledger) it is a local read.
    """
    for attempt in range(_READ_ATTEMPTS):
        try:
            if collective:
                path_str, found = _on_primary(lambda: _resolved(directory, step))
                path = pathlib.Path(path_str)
                with _together():
                    opened = _open_once(path, found)
            else:
                path, found = _resolve(directory, step)
                opened = _open_once(path, found)
            if state_files:
                _check_state_files(opened)
            return opened
        except _CopyMoved:
            if attempt == _READ_ATTEMPTS - 1:
                raise CheckpointCorruptedError(
                    f"checkpoint {path} kept moving while being read (a save running in another "
                    "process?); try again."
                ) from None
    raise AssertionError("unreachable")


def _resolved(directory: Any, step: int | None) -> list[Any]:
    path, found = _resolve(directory, step)
    return [str(path), found]


def _compare(manifest: dict, target_flat: dict[str, Any], path: pathlib.Path) -> None:
    saved = manifest["leaves"]
    missing = sorted(set(target_flat) - set(saved))
    unexpected = sorted(set(saved) - set(target_flat))
    differing = []
    for key in sorted(set(saved) & set(target_flat)):
        leaf = target_flat[key]
        shape = list(leaf.shape if hasattr(leaf, "shape") else np.shape(leaf))
        if shape != saved[key]["shape"]:
            differing.append(f"{key}: shape {saved[key]['shape']} saved, {shape} in target")
        elif (
            key != "step"
            and hasattr(leaf, "dtype")
            and np.dtype(leaf.dtype).name != saved[key]["dtype"]
        ):
            differing.append(
                f"{key}: dtype {saved[key]['dtype']} saved, {np.dtype(leaf.dtype).name} in target"
            )
    if missing or unexpected or differing:
        lines = [f"checkpoint {path} does not match the target state's structure:"]
        if missing:
            lines.append(f"  in the target but not in the checkpoint: {missing}")
        if unexpected:
            lines.append(f"  in the checkpoint but not in the target: {unexpected}")
        if differing:
            lines.append("  differing leaves: " + "; ".join(differing))
        lines.append(
            "Build the target with the same model config and optimizer as the saved state."
        )
        raise CheckpointMismatchError("\n".join(lines))


ShardingOf = Callable[[str, Any, dict[str, Any]], "jax.sharding.Sharding | None"]


def _restore_arrays(
    path: pathlib.Path, manifest: dict, target_tree: Any | None, sharding_of: ShardingOf
) -> Any:
    """The saved arrays in ``target_tree``'s structure (or the saved one if ``None``).

    ``sharding_of(leaf path, target leaf, manifest entry)`` gives a leaf's sharding: orbax then reads
    only this process's shards of it into a ``jax.Array``; ``None`` reads it whole as numpy.
    Collective when a sharding spans several processes.
    """
    leaves = manifest["leaves"]
    try:
        with _checkpointer() as ckptr:
            if target_tree is None:
                target_tree = ckptr.metadata(path / STATE_DIR).item_metadata.tree

            def restore_args(key_path: tuple, leaf: Any) -> ocp.RestoreArgs:
                key = _path_str(key_path)
                info = leaves.get(key)
                sharding = None if info is None else sharding_of(key, leaf, info)
                if sharding is None:
                    return ocp.RestoreArgs(restore_type=np.ndarray)
                return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(info["shape"]))

            args = jax.tree_util.tree_map_with_path(restore_args, target_tree)
            return ckptr.restore(
                path / STATE_DIR, args=ocp.args.PyTreeRestore(item=target_tree, restore_args=args)
            )
    except Exception as e:
        if not path.is_dir():
            raise _CopyMoved from None
        raise CheckpointCorruptedError(
            f"checkpoint {path} is corrupted: its arrays cannot be read ({type(e).__name__}: {e})."
        ) from e


def _target_sharding(key: str, leaf: Any, info: dict[str, Any]) -> jax.sharding.Sharding | None:
    """Restore onto the target leaf's sharding (a jax.Array's, or a ShapeDtypeStruct's if set)."""
    del info
    sharding = getattr(leaf, "sharding", None)
    if key == "step" or not isinstance(sharding, jax.sharding.Sharding):
        return None  # the step counter is a host value; unsharded targets get numpy, then placed
    return sharding


def _spread_sharding(key: str, leaf: Any, info: dict[str, Any]) -> jax.sharding.Sharding | None:
    """Without a target: numpy in one process; over every device in several, split along the
    largest dimension that the device count divides (replicated if none does)."""
    del leaf
    if key == "step" or _multihost.process_count() == 1:
        return None
    devices = jax.devices()
    mesh = jax.sharding.Mesh(
        np.array(devices), ("checkpoint",), axis_types=(jax.sharding.AxisType.Auto,)
    )
    shape = info["shape"]
    spec: list[str | None] = [None] * len(shape)
    for axis in sorted(range(len(shape)), key=lambda a: (-shape[a], a)):
        if shape[axis] % len(devices) == 0:
            spec[axis] = "checkpoint"
            break
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _blocks_recorded(info: dict[str, Any]) -> list[str] | None:
    blocks = info.get("blocks")
    if not isinstance(blocks, list) or not all(
        isinstance(b, str) and len(b) == 64 and all(c in "0123456789abcdef" for c in b)
        for b in blocks
    ):
        return None
    return blocks


def _check_arrays(path: pathlib.Path, manifest: dict, restored: Any) -> None:
    """Every restored leaf against the manifest: shape, dtype, the leaf digest against its block
    digests (locally), then every block where it lives (collective; the first mismatch by leaf and
    block is raised on every process)."""
    restored_flat = _flat(restored)
    leaves = manifest["leaves"]
    for key, info in leaves.items():
        if key not in restored_flat:
            raise _fail(path, f"array {key}", "listed in the manifest was not restored.")
        shape, dtype = digests.shape_dtype(restored_flat[key])
        blocks = _blocks_recorded(info)
        if (
            blocks is None
            or shape != info.get("shape")
            or dtype != info.get("dtype")
            or len(blocks) != digests.num_blocks(shape, BLOCK_ELEMENTS)
            or digests.combine(blocks) != info.get("sha256")
        ):
            raise _fail(
                path,
                f"array {key}",
                f"does not match its recorded shape/dtype/SHA-256 (saved {info.get('shape')} "
                f"{info.get('dtype')}, restored {shape} {dtype}; the leaf digest must be the "
                "SHA-256 of its block digests).",
            )
    with _together():
        found = digests.first_mismatch(restored_flat, leaves, BLOCK_ELEMENTS)
        if found is not None:
            shape = leaves[found.path]["shape"]
            rows = digests.block_rows(shape, BLOCK_ELEMENTS)
            where = ""
            if shape:
                first = found.block * rows
                where = f" (leading indices {first}..{min(shape[0], first + rows) - 1})"
            error = _fail(
                path,
                f"array {found.path}",
                f"does not match its recorded SHA-256: block {found.block}{where} hashes to "
                f"{found.actual}, the manifest records {found.expected}.",
            )
            error.order = ["array", f"{found.position:09d}", f"{found.block:012d}"]
            raise error


def _place(value: Any, like: Any) -> Any:
    """A restored leaf on the target leaf's devices (orbax already placed the sharded ones)."""
    if isinstance(value, jax.Array):
        return value
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):
        if sharding.is_fully_addressable:
            return jax.device_put(value, sharding)
        # A host value (the step) onto devices of several processes: each places its own shards.
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    return jnp.asarray(value)


def read_metadata(directory: Any, *, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, verified, without restoring its arrays.

    Useful to rebuild the model and optimizer (``metadata["model"]``) that make the
    ``target_state`` of :func:`restore_checkpoint`. The marker, manifest, metadata and ledger are
    verified (not the array files: :func:`restore_checkpoint` and :func:`verify_checkpoint` do that).
    A local read: in a multi-process run any process may call it on its own.

    Raises:
      CheckpointNotFoundError: no (complete) checkpoint of that step.
      CheckpointVerificationError: the metadata or ledger does not verify (the message names the
        first mismatch).
    """
    return _open(directory, step, state_files=False).metadata


def read_ledger(directory: Any, *, step: int | None = None) -> Ledger:
    """The deletion ledger of a checkpoint, verified as by :func:`read_metadata`."""
    return _open(directory, step, state_files=False).ledger


def _open_and_restore(
    directory: Any, step: int | None, target_tree: Any | None, sharding_of: ShardingOf
) -> tuple[_Opened, Any]:
    """Opens and verifies a checkpoint's files, then reads its arrays (collective; a copy moved by a
    concurrent save is looked up again, by every process together)."""
    for attempt in range(_READ_ATTEMPTS):
        opened = _open(directory, step, state_files=True, collective=True)
        if target_tree is not None:
            _compare(opened.manifest, _flat(target_tree), opened.path)
        try:
            with _together():
                restored = _restore_arrays(opened.path, opened.manifest, target_tree, sharding_of)
        except _CopyMoved:
            if attempt == _READ_ATTEMPTS - 1:
                raise CheckpointCorruptedError(
                    f"checkpoint {opened.path} kept moving while being read; try again."
                ) from None
            continue
        return opened, restored
    raise AssertionError("unreachable")


def restore_checkpoint(
    directory: Any, target_state: Any, *, step: int | None = None
) -> tuple[Any, dict[str, Any]]:
    """Restores a checkpoint saved by :func:`save_checkpoint` into the structure of ``target_state``.

    Args:
      directory: the checkpoint directory.
      target_state: a ``TrainState`` with the saved tree's structure, shapes and dtypes, built with
        the same model and optimizer: a concrete one (from ``create_train_state``, or sharded by
        :func:`unlearn_jax.sharding.shard_state`) or an abstract one of ``jax.ShapeDtypeStruct``
        leaves, which costs no initialisation:
        ``jax.eval_shape(lambda k: create_train_state(model, x, opt, k), key)``. A leaf with a
        sharding (a ``jax.Array``'s, or a ``ShapeDtypeStruct``'s ``sharding=``, e.g. from
        :func:`unlearn_jax.sharding.shardings_for`) is restored onto it: each process reads only
        its own shards, whatever sharding and number of processes saved it. Other leaves are read
        on the host and put on the default device. ``target_state`` supplies ``apply_fn`` and
        ``tx``; its values are not used.
      step: the step to restore; ``None`` restores the latest complete one.

    Returns:
      ``(state, metadata)``: ``target_state`` with ``params``, ``opt_state`` and ``step`` replaced by
      the saved arrays (bit-identical to what was saved), and the saved metadata dict. The ledger:
      :func:`read_ledger`. Every block of every array was checked against the manifest by the
      process holding it.

    In a multi-process run this is a collective: every process calls it with the same arguments.

    Raises:
      CheckpointNotFoundError: no directory, no complete checkpoint in it, or not that step (the
        message lists the available steps).
      CheckpointVerificationError: a file, the metadata, the ledger or an array does not match its
        recorded hash (the message names the first mismatch).
      CheckpointCorruptedError: files that verify but cannot be decoded.
      CheckpointMismatchError: the saved tree differs from the target's; the message lists the
        paths missing on either side and the leaves whose shape or dtype differs.
    """
    target_tree = _state_dict(target_state, for_saving=False)
    opened, restored = _open_and_restore(directory, step, target_tree, _target_sharding)
    _check_arrays(opened.path, opened.manifest, restored)
    params = jax.tree_util.tree_map(_place, restored["params"], target_tree["params"])
    opt_state = jax.tree_util.tree_map(_place, restored["opt_state"], target_tree["opt_state"])
    saved_step = np.asarray(restored["step"])
    if hasattr(target_state.step, "dtype"):
        saved_step = saved_step.astype(target_state.step.dtype)
    state = target_state.replace(
        params=serialization.from_state_dict(target_state.params, params),
        opt_state=serialization.from_state_dict(target_state.opt_state, opt_state),
        step=_place(saved_step, target_state.step),
    )
    return state, opened.metadata


class VerificationReport(NamedTuple):
    """What :func:`verify_checkpoint` checked and found.

    Attributes:
      path: the step directory verified.
      step: its step.
      generation: its save generation (1 for the first save of the step, +1 per overwrite).
      digest: :func:`checkpoint_digest` of the saved arrays and metadata, recomputed.
      files: the number of files checked against their SHA-256.
      arrays: the number of array leaves checked against their SHA-256.
      ledger: the deletion ledger (verified).
      matches_ledger: whether ``digest`` is the last record's ``checkpoint_after`` (``None`` for an
        empty ledger). False means the model or its metadata changed after the last deletion.
      gaps: records whose ``checkpoint_before`` is not the previous record's ``checkpoint_after``
        (the model changed between two requests).
    """

    path: pathlib.Path
    step: int
    generation: int
    digest: str
    files: int
    arrays: int
    ledger: Ledger
    matches_ledger: bool | None
    gaps: tuple[int, ...]


def verify_checkpoint(
    directory: Any, step: int | None = None, *, anchor: str | None = None
) -> VerificationReport:
    """Recomputes every digest of a checkpoint, without a target state; raises at the first mismatch.

    Checks, in order: the commit marker; ``manifest.json`` against the marker's SHA-256;
    ``metadata.json`` and ``ledger.json`` against the manifest; the ledger's hash chain (and
    ``anchor``); every file of ``state/`` (size, SHA-256); every array, read back, block by block
    against its SHA-256s; then recomputes the checkpoint's digest.

    In a single process the arrays are read as numpy (host memory holds the state once). In a
    multi-process run this
    is a collective: each array is read spread over every device (split along its largest
    dimension divisible by the device count; replicated when none is) and each process checks its
    own blocks. To check a state too large for that, restore it onto its own shardings with
    :func:`restore_checkpoint`, which runs the same checks.

    Args:
      directory: the checkpoint directory.
      step: the step to verify (default: the latest complete one).
      anchor: a ledger record hash published earlier; the ledger must still contain it.

    Returns:
      A :class:`VerificationReport`.

    Raises:
      CheckpointNotFoundError: no (complete) checkpoint of that step.
      CheckpointVerificationError: the first mismatch (its ``item`` says what failed).
      CheckpointCorruptedError: files that verify but cannot be decoded.
    """
    opened, restored = _open_and_restore(directory, step, None, _spread_sharding)
    path, manifest, ledger = opened.path, opened.manifest, opened.ledger
    if anchor is not None:
        try:
            ledger.verify(anchor=anchor)
        except LedgerError as err:
            raise _fail(path, LEDGER_FILE, f"does not verify: {err}") from None
    _check_arrays(path, manifest, restored)
    digest = _digest(manifest["leaves"], opened.metadata)
    if digest != manifest.get("digest"):
        raise _fail(path, MANIFEST_FILE, f"records digest {manifest.get('digest')}, recomputed "
                                         f"{digest}.")  # fmt: skip
    head = ledger.head
    return VerificationReport(
        path=path,
        step=opened.step,
        generation=int(manifest.get("generation", 0)),
        digest=digest,
        files=len(manifest["files"]),
        arrays=len(manifest["leaves"]),
        ledger=ledger,
        matches_ledger=None if head is None else head.checkpoint_after == digest,
        gaps=ledger.gaps(),
    )


__all__ = [
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointVerificationError",
    "VerificationReport",
    "checkpoint_digest",
    "latest_step",
    "list_steps",
    "read_ledger",
    "read_metadata",
    "restore_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]
