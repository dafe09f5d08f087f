"""Checkpoints: atomic, verified orbax checkpoints of a ``TrainState`` with JSON metadata.

See :mod:`unlearn_jax.checkpoint.store` for the on-disk layout and the guarantees.
"""

from unlearn_jax.checkpoint.store import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    latest_step,
    list_steps,
    read_metadata,
    restore_checkpoint,
    save_checkpoint,
)

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
