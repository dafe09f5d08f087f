"""Orbax checkpoints of a ``TrainState`` with JSON metadata and a deletion ledger, saved atomically,
verified whole before use.

Layout. A checkpoint *directory* holds one sub-directory per saved step::

    directory/
      10/
        state/            the arrays (an orbax PyTree checkpoint of params, opt_state and step)
        metadata.json     the caller's JSON dict (model config, data set, optimizer, ...)
        ledger.json       the deletion ledger (:class:`~unlearn_jax.checkpoint.ledger.Ledger`)
        manifest.json     for every array leaf: path, shape, dtype, SHA-256 of its bytes; for every
                          file above: size and SHA-256; the checkpoint's digest and generation
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

Verification. Nothing is used before it checks out, in this order: the marker, ``manifest.json``
against the marker's SHA-256, ``metadata.json`` and ``ledger.json`` against the manifest, the
ledger's hash chain, every file of ``state/`` against the manifest (so a truncated or missing file is
named before orbax reads it), and, on restore, every array against its SHA-256. A failure raises
:class:`CheckpointVerificationError` naming the first mismatch. :func:`verify_checkpoint` runs every
check without a target state and reports the checkpoint's digest and ledger.

What verification proves. The hashes detect corruption and edits by anything that does not recompute
them; whoever can write the directory can recompute them all. Anchor the ledger (publish a record's
hash, pass it back as ``anchor=``) to detect a rewritten ledger. One process, one writer: concurrent
writers to the same directory are not supported, nor are arrays not addressable from this process
(multi-host).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from unlearn_jax.checkpoint import _layout
from unlearn_jax.checkpoint.ledger import (
    Ledger,
    LedgerError,
    canonical_json,
    json_safe,
    sha256_hex,
)

FORMAT = "unlearn_jax.checkpoint/2"
DIGEST_FORMAT = "unlearn_jax.checkpoint-digest/1"
STATE_DIR = "state"
METADATA_FILE = "metadata.json"
LEDGER_FILE = "ledger.json"
MANIFEST_FILE = "manifest.json"
_READ_ATTEMPTS = 3  # a copy renamed by a concurrent save while being read is looked up again


class CheckpointError(Exception):
    """Base class of the errors raised when a checkpoint cannot be restored."""


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


# ---- trees <-> flat manifests ---------------------------------------------------------------------
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
        step = np.asarray(step).astype(np.int64)
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


def _leaf_info(leaf: Any) -> dict[str, Any]:
    arr = np.asarray(leaf)
    return {
        "shape": list(arr.shape),
        "dtype": arr.dtype.name,
        "sha256": hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest(),
    }


def _digest(leaves: dict[str, Any], metadata: Any) -> str:
    return sha256_hex(
        canonical_json({"format": DIGEST_FORMAT, "leaves": leaves, "metadata": metadata})
    )


def checkpoint_digest(state: Any, metadata: dict[str, Any]) -> str:
    """The digest of a model as a checkpoint stores it: its arrays and its metadata.

    ``SHA-256(canonical_json({"format": DIGEST_FORMAT, "leaves": {path: {"shape", "dtype",
    "sha256"}}, "metadata": metadata}))`` over the leaves of ``params``, ``opt_state`` and ``step``
    (``sha256`` of each array's C-order bytes). It does not depend on where or how often the state is
    saved, so a :class:`~unlearn_jax.checkpoint.ledger.Ledger` record's ``before``/``after`` digests
    identify models, and :func:`verify_checkpoint` reports the saved model's.

    Args:
      state: a flax ``TrainState`` (its arrays are copied to the host).
      metadata: the JSON-safe metadata dict saved with it.

    Returns:
      64 lowercase hex digits.
    """
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}.")
    host = jax.tree_util.tree_map(np.asarray, _state_dict(state))
    leaves = {path: _leaf_info(leaf) for path, leaf in _flat(host).items()}
    return _digest(leaves, _metadata_json(metadata))


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


def _write_state(path: pathlib.Path, host_tree: Any) -> None:
    with _checkpointer() as ckptr:
        ckptr.save(path, args=ocp.args.PyTreeSave(host_tree))


def _hash_files(copy_dir: pathlib.Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file in a copy, each flushed to disk."""
    files = {}
    for dirpath, _, names in os.walk(copy_dir):
        for name in sorted(names):
            path = pathlib.Path(dirpath) / name
            fd = os.open(path, os.O_RDONLY)
            try:
                h, size = hashlib.sha256(), 0
                while chunk := os.read(fd, 1 << 20):
                    h.update(chunk)
                    size += len(chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            files[path.relative_to(copy_dir).as_posix()] = {"size": size, "sha256": h.hexdigest()}
        _layout.fsync_dir(pathlib.Path(dirpath))
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

    Args:
      directory: the checkpoint directory (created if missing); several steps may live in it.
      state: a flax ``TrainState`` (a stacked one from ``fit_many`` too).
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
      ValueError: for a negative or non-integer step.
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
        step = int(state.step)
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got step={step!r}.")
    step = int(step)

    host_tree = jax.tree_util.tree_map(np.asarray, tree)
    leaves = {path: _leaf_info(leaf) for path, leaf in _flat(host_tree).items()}

    def write(staging: pathlib.Path, generation: int) -> str:
        _write_state(staging / STATE_DIR, host_tree)
        _layout.write_file(staging / METADATA_FILE, _pretty(meta))
        _layout.write_file(staging / LEDGER_FILE, _pretty(ledger.to_json()))
        manifest = {
            "format": FORMAT,
            "step": step,
            "generation": generation,
            "digest": _digest(leaves, meta),
            "leaves": leaves,
            "files": _hash_files(staging),
        }
        manifest_bytes = _pretty(manifest)
        _layout.write_file(staging / MANIFEST_FILE, manifest_bytes)
        return sha256_hex(manifest_bytes)

    return _layout.save(_root(directory), step, FORMAT, write, overwrite=overwrite)


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


def _open_once(path: pathlib.Path, step: int, *, state_files: bool) -> _Opened:
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

    if state_files:
        for rel in sorted(files):
            if rel not in (METADATA_FILE, LEDGER_FILE):
                _check_file(path, rel, files[rel])
    return _Opened(path, step, manifest, metadata, ledger)


def _open(directory: Any, step: int | None, *, state_files: bool) -> _Opened:
    """Resolves and verifies a checkpoint's JSON items (and its state files if asked)."""
    for _ in range(_READ_ATTEMPTS - 1):
        path, found = _resolve(directory, step)
        try:
            return _open_once(path, found, state_files=state_files)
        except _CopyMoved:
            continue
    path, found = _resolve(directory, step)
    try:
        return _open_once(path, found, state_files=state_files)
    except _CopyMoved:
        raise CheckpointCorruptedError(
            f"checkpoint {path} kept moving while being read (a save running in another process?); "
            "try again."
        ) from None


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


def _restore_arrays(path: pathlib.Path, target_tree: Any | None) -> Any:
    """The saved arrays as numpy, in ``target_tree``'s structure (or the saved one if ``None``)."""
    try:
        with _checkpointer() as ckptr:
            if target_tree is None:
                target_tree = ckptr.metadata(path / STATE_DIR).item_metadata.tree
            restore_args = jax.tree_util.tree_map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target_tree
            )
            return ckptr.restore(
                path / STATE_DIR,
                args=ocp.args.PyTreeRestore(item=target_tree, restore_args=restore_args),
            )
    except Exception as e:
        if not path.is_dir():
            raise _CopyMoved from None
        raise CheckpointCorruptedError(
            f"checkpoint {path} is corrupted: its arrays cannot be read ({type(e).__name__}: {e})."
        ) from e


def _check_arrays(path: pathlib.Path, manifest: dict, restored: Any) -> None:
    restored_flat = _flat(restored)
    for key, info in manifest["leaves"].items():
        if key not in restored_flat:
            raise _fail(path, f"array {key}", "listed in the manifest was not restored.")
        if _leaf_info(restored_flat[key]) != info:
            raise _fail(
                path,
                f"array {key}",
                f"does not match its recorded shape/dtype/SHA-256 (saved {info['shape']} "
                f"{info['dtype']}).",
            )


def _place(arr: np.ndarray, like: Any) -> Any:
    sharding = getattr(like, "sharding", None)
    if sharding is not None:
        return jax.device_put(arr, sharding)
    return jnp.asarray(arr)


def read_metadata(directory: Any, *, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, verified, without restoring its arrays.

    Useful to rebuild the model and optimizer (``metadata["model"]``) that make the
    ``target_state`` of :func:`restore_checkpoint`. The marker, manifest, metadata and ledger are
    verified (not the array files: :func:`restore_checkpoint` and :func:`verify_checkpoint` do that).

    Raises:
      CheckpointNotFoundError: no (complete) checkpoint of that step.
      CheckpointVerificationError: the metadata or ledger does not verify (the message names the
        first mismatch).
    """
    return _open(directory, step, state_files=False).metadata


def read_ledger(directory: Any, *, step: int | None = None) -> Ledger:
    """The deletion ledger of a checkpoint, verified as by :func:`read_metadata`."""
    return _open(directory, step, state_files=False).ledger


def restore_checkpoint(
    directory: Any, target_state: Any, *, step: int | None = None
) -> tuple[Any, dict[str, Any]]:
    """Restores a checkpoint saved by :func:`save_checkpoint` into the structure of ``target_state``.

    Args:
      directory: the checkpoint directory.
      target_state: a ``TrainState`` with the saved tree's structure, shapes and dtypes, built with
        the same model and optimizer: a concrete one (from ``create_train_state``; arrays are put on
        its leaves' devices) or an abstract one of ``jax.ShapeDtypeStruct`` leaves, which costs no
        initialisation: ``jax.eval_shape(lambda k: create_train_state(model, x, opt, k), key)``.
        It supplies ``apply_fn`` and ``tx``; its values are not used.
      step: the step to restore; ``None`` restores the latest complete one.

    Returns:
      ``(state, metadata)``: ``target_state`` with ``params``, ``opt_state`` and ``step`` replaced by
      the saved arrays (bit-identical to what was saved), and the saved metadata dict. The ledger:
      :func:`read_ledger`.

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
    for _ in range(_READ_ATTEMPTS):
        opened = _open(directory, step, state_files=True)
        _compare(opened.manifest, _flat(target_tree), opened.path)
        try:
            restored = _restore_arrays(opened.path, target_tree)
        except _CopyMoved:
            continue
        break
    else:
        raise CheckpointCorruptedError(
            f"checkpoint {opened.path} kept moving while being read; try again."
        )
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
    ``anchor``); every file of ``state/`` (size, SHA-256); every array, read back, against its
    SHA-256; then recomputes the checkpoint's digest.

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
    for _ in range(_READ_ATTEMPTS):
        opened = _open(directory, step, state_files=True)
        try:
            restored = _restore_arrays(opened.path, None)
        except _CopyMoved:
            continue
        break
    else:
        raise CheckpointCorruptedError(
            f"checkpoint {opened.path} kept moving while being read; try again."
        )
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
