"""Orbax checkpoints of a ``TrainState`` with JSON metadata, written atomically and verified on restore.

Layout. A checkpoint *directory* holds one sub-directory per saved step::

    directory/
      10/                   a complete checkpoint (orbax composite: state, manifest, metadata)
      20/
      .staging-30-<uuid>/   an unfinished write (ignored by readers, removed when the write fails)

Each step stores three items: ``state`` (``params``, ``opt_state`` and ``step`` of the
``TrainState``, as the state dict of :func:`flax.serialization.to_state_dict`), ``metadata`` (the
caller's JSON dict: model config, dataset name, forget-ids hash, method, metrics, ...) and
``manifest`` (for every array leaf: path, shape, dtype and SHA-256 of its bytes).

Atomicity. A save writes into a fresh hidden staging directory (orbax itself writes to a temporary
name and renames on success) and only then renames it to ``directory/<step>``. A write interrupted
at any point before that rename (an exception, a killed process) leaves every earlier checkpoint
untouched. Overwriting a step renames the old checkpoint aside, renames the new one in, and deletes
the old one; a crash between those two renames leaves the old checkpoint under its aside name, and
readers fall back to it, so a completed checkpoint of the step is always found.

Verification. :func:`restore_checkpoint` compares the manifest with the target's tree before
reading any array (a structure mismatch names the differing paths) and checks every restored array
against its SHA-256, so truncated or overwritten files are reported as corruption instead of
silently producing wrong parameters. One process, one writer: concurrent writers to the same
directory are not supported, nor are arrays not addressable from this process (multi-host).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import re
import shutil
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

FORMAT = "unlearn_jax.checkpoint/1"
_STEP_RE = re.compile(r"^\d+$")
_ASIDE_RE = re.compile(r"^\.old-(\d+)-[0-9a-f]+$")
_STAGING_PREFIX = ".staging-"


class CheckpointError(Exception):
    """Base class of the errors raised when a checkpoint cannot be restored."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No (complete) checkpoint at the given directory or step."""


class CheckpointCorruptedError(CheckpointError):
    """A checkpoint exists but its files are unreadable or do not match their recorded hashes."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint is intact but its tree differs from the target's (paths, shapes or dtypes)."""


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


def _to_json(value: Any, where: str) -> Any:
    """JSON-safe copy of ``value``: numpy/JAX scalars and arrays become Python numbers and lists."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"metadata keys must be strings, got {k!r} at {where or '<root>'}.")
            out[k] = _to_json(v, f"{where}/{k}" if where else k)
        return out
    if isinstance(value, list | tuple):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.generic | np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(
        f"metadata value at {where or '<root>'} is a {type(value).__name__}, which JSON cannot hold; "
        "use numbers, strings, booleans, None, lists and dicts (numpy scalars/arrays are converted)."
    )


# ---- directory layout -----------------------------------------------------------------------------
def _root(directory: Any) -> pathlib.Path:
    return pathlib.Path(os.path.abspath(os.fspath(directory)))


def _completed(root: pathlib.Path) -> dict[int, pathlib.Path]:
    """Step -> directory of every complete checkpoint (a step's aside copy only if it lacks one)."""
    found: dict[int, pathlib.Path] = {}
    if not root.is_dir():
        return found
    asides = []
    for entry in root.iterdir():
        if not entry.is_dir():
            continue
        if _STEP_RE.match(entry.name):
            found[int(entry.name)] = entry
        elif m := _ASIDE_RE.match(entry.name):
            asides.append((int(m.group(1)), entry))
    for step, entry in sorted(asides, key=lambda a: a[1].stat().st_mtime):
        if step not in found or found[step].name.startswith(".old-"):
            found[step] = entry
    return found


def list_steps(directory: Any) -> list[int]:
    """The steps with a complete checkpoint in ``directory``, ascending (``[]`` if none or missing)."""
    return sorted(_completed(_root(directory)))


def latest_step(directory: Any) -> int | None:
    """The largest step with a complete checkpoint in ``directory``, or ``None``."""
    steps = list_steps(directory)
    return steps[-1] if steps else None


def _checkpointer() -> ocp.Checkpointer:
    # Synchronous directory creation: orbax's default creates the item directories in a background
    # thread, which after a failed write would re-create the staging directory we just removed.
    options = ocp.CompositeOptions(
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False)
    )
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(composite_options=options))


# ---- save -------------------------------------------------------------------------------------------
def save_checkpoint(
    directory: Any,
    state: Any,
    metadata: dict[str, Any],
    *,
    step: int | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Saves ``state`` (params, opt_state, step) and ``metadata`` as ``directory/<step>``, atomically.

    Args:
      directory: the checkpoint directory (created if missing); several steps may live in it.
      state: a flax ``TrainState`` (a stacked one from ``fit_many`` too).
      metadata: a JSON-serialisable dict (string keys; numpy/JAX scalars and arrays are converted
        to numbers and lists), e.g. ``{"model": model_config(model), "dataset": "digits",
        "forget_ids_hash": ..., "method": "retrain", "metrics": {...}}``.
      step: the step to save under; defaults to ``int(state.step)`` (required when ``state.step`` is
        not a scalar, as for stacked states).
      overwrite: replace an existing checkpoint of the same step. The replacement is atomic: the old
        checkpoint stays in place until the new one is completely written.

    Returns:
      The path of the saved checkpoint, ``directory/<step>``.

    Raises:
      FileExistsError: if ``directory/<step>`` exists and ``overwrite`` is False.
      TypeError: if ``metadata`` is not JSON-serialisable (the message gives the offending key) or
        ``state`` is not a TrainState.
      ValueError: for a negative or non-integer step.
    """
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}.")
    meta = _to_json(metadata, "")
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

    root = _root(directory)
    final = root / str(step)
    if (final.exists() or step in _completed(root)) and not overwrite:
        raise FileExistsError(
            f"a checkpoint already exists at {final}; pass overwrite=True to replace it (atomically) "
            "or save under another step."
        )
    root.mkdir(parents=True, exist_ok=True)

    host_tree = jax.tree_util.tree_map(np.asarray, tree)
    manifest = {
        "format": FORMAT,
        "step": step,
        "leaves": {path: _leaf_info(leaf) for path, leaf in _flat(host_tree).items()},
    }
    staging = root / f"{_STAGING_PREFIX}{step}-{uuid.uuid4().hex}"
    try:
        with _checkpointer() as ckptr:
            ckptr.save(
                staging,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeSave(host_tree),
                    manifest=ocp.args.JsonSave(manifest),
                    metadata=ocp.args.JsonSave(meta),
                ),
            )
    except BaseException:
        _remove_staging(root, staging.name)
        raise
    _commit(staging, final)
    return final


def _remove_staging(root: pathlib.Path, name: str) -> None:
    # orbax writes to "<name>.orbax-checkpoint-tmp-*" first, then renames to <name>.
    for entry in root.glob(f"{name}*"):
        shutil.rmtree(entry, ignore_errors=True)


def _commit(staging: pathlib.Path, final: pathlib.Path) -> None:
    """Moves a complete staging checkpoint to its final name, keeping the old one until then."""
    aside = None
    try:
        if final.exists():
            aside = final.with_name(f".old-{final.name}-{uuid.uuid4().hex}")
            os.rename(final, aside)
        os.rename(staging, final)
    except BaseException:
        # Roll back to the old checkpoint; if even that fails, readers still find it aside.
        if aside is not None and aside.exists() and not final.exists():
            with contextlib.suppress(OSError):
                os.rename(aside, final)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # The old checkpoint, and asides left by earlier interrupted commits of this step, are stale now.
    for entry in final.parent.glob(f".old-{final.name}-*"):
        shutil.rmtree(entry, ignore_errors=True)


# ---- restore ----------------------------------------------------------------------------------------
def _resolve(directory: Any, step: int | None) -> tuple[pathlib.Path, int]:
    root = _root(directory)
    if not root.exists():
        raise CheckpointNotFoundError(f"no checkpoint directory at {root}.")
    completed = _completed(root)
    if not completed:
        staging = sorted(e.name for e in root.iterdir() if e.name.startswith(_STAGING_PREFIX))
        extra = f" (only unfinished writes: {staging})" if staging else ""
        raise CheckpointNotFoundError(f"{root} holds no complete checkpoint{extra}.")
    if step is None:
        step = max(completed)
    if step not in completed:
        raise CheckpointNotFoundError(
            f"no checkpoint of step {step} in {root}; available steps: {sorted(completed)}."
        )
    return completed[step], step


def _read_json_items(path: pathlib.Path) -> tuple[dict, dict]:
    try:
        with _checkpointer() as ckptr:
            items = ckptr.restore(
                path,
                args=ocp.args.Composite(
                    manifest=ocp.args.JsonRestore(), metadata=ocp.args.JsonRestore()
                ),
            )
        manifest, metadata = items["manifest"], items["metadata"]
    except Exception as e:
        raise CheckpointCorruptedError(
            f"checkpoint {path} is corrupted: its manifest or metadata cannot be read ({type(e).__name__}: "
            f"{e})."
        ) from e
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or "leaves" not in manifest
    ):
        raise CheckpointCorruptedError(
            f"checkpoint {path} is corrupted or not an unlearn_jax checkpoint: bad manifest "
            f"(expected format {FORMAT!r})."
        )
    return manifest, metadata


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


def _place(arr: np.ndarray, like: Any) -> Any:
    sharding = getattr(like, "sharding", None)
    if sharding is not None:
        return jax.device_put(arr, sharding)
    return jnp.asarray(arr)


def read_metadata(directory: Any, *, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without restoring its arrays.

    Useful to rebuild the model and optimizer (``metadata["model"]``) that make the
    ``target_state`` of :func:`restore_checkpoint`.

    Raises:
      CheckpointNotFoundError: no (complete) checkpoint of that step.
      CheckpointCorruptedError: its manifest or metadata cannot be read.
    """
    path, _ = _resolve(directory, step)
    _, metadata = _read_json_items(path)
    return metadata


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
      the saved arrays (bit-identical to what was saved), and the saved metadata dict.

    Raises:
      CheckpointNotFoundError: no directory, no complete checkpoint in it, or not that step (the
        message lists the available steps).
      CheckpointCorruptedError: unreadable files or arrays whose bytes differ from their SHA-256.
      CheckpointMismatchError: the saved tree differs from the target's; the message lists the
        paths missing on either side and the leaves whose shape or dtype differs.
    """
    path, step = _resolve(directory, step)
    manifest, metadata = _read_json_items(path)
    target_tree = _state_dict(target_state, for_saving=False)
    target_flat = _flat(target_tree)
    _compare(manifest, target_flat, path)

    restore_args = jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target_tree
    )
    try:
        with _checkpointer() as ckptr:
            restored = ckptr.restore(
                path,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(item=target_tree, restore_args=restore_args)
                ),
            )["state"]
    except Exception as e:
        raise CheckpointCorruptedError(
            f"checkpoint {path} is corrupted: its arrays cannot be read ({type(e).__name__}: {e})."
        ) from e

    restored_flat = _flat(restored)
    for key, info in manifest["leaves"].items():
        arr = np.asarray(restored_flat[key])
        if _leaf_info(arr) != info:
            raise CheckpointCorruptedError(
                f"checkpoint {path} is corrupted: array {key!r} does not match its recorded "
                f"shape/dtype/SHA-256 (saved {info['shape']} {info['dtype']})."
            )
    params = jax.tree_util.tree_map(_place, restored["params"], target_tree["params"])
    opt_state = jax.tree_util.tree_map(_place, restored["opt_state"], target_tree["opt_state"])
    step = np.asarray(restored["step"])
    if hasattr(target_state.step, "dtype"):
        step = step.astype(target_state.step.dtype)
    state = target_state.replace(
        params=serialization.from_state_dict(target_state.params, params),
        opt_state=serialization.from_state_dict(target_state.opt_state, opt_state),
        step=_place(step, target_state.step),
    )
    return state, metadata


__all__ = [
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "latest_step",
    "list_steps",
    "read_metadata",
    "restore_checkpoint",
    "save_checkpoint",
]
