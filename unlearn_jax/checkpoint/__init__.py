"""Checkpoints: atomic, verified orbax checkpoints of a ``TrainState`` with JSON metadata and a
hash-chained deletion ledger, saved and restored sharded by any number of processes.

See :mod:`unlearn_jax.checkpoint.store` for the on-disk layout, what is verified and the multi-process
protocol, :mod:`unlearn_jax.checkpoint._digest` for the array digests (the same for any sharding and
number of processes), :mod:`unlearn_jax.checkpoint.ledger` for the ledger's records and guarantees,
and :mod:`unlearn_jax.checkpoint._layout` for how saves survive being killed.
"""

from unlearn_jax.checkpoint.ledger import (
    GENESIS,
    GUARANTEES,
    DeletionRecord,
    Ledger,
    LedgerError,
    ids_hash,
)
from unlearn_jax.checkpoint.store import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointVerificationError,
    VerificationReport,
    checkpoint_digest,
    latest_step,
    list_steps,
    read_ledger,
    read_metadata,
    restore_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

__all__ = [
    "GENESIS",
    "GUARANTEES",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointVerificationError",
    "DeletionRecord",
    "Ledger",
    "LedgerError",
    "VerificationReport",
    "checkpoint_digest",
    "ids_hash",
    "latest_step",
    "list_steps",
    "read_ledger",
    "read_metadata",
    "restore_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]
