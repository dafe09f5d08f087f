"""``unlearn-jax``: the command-line tool (also ``python -m unlearn_jax``).

Sub-commands:

* ``bench`` -- the main job: originals, retrained oracles, every method, every metric; prints one
  table and writes ``results.json``, ``table.txt`` and plots to ``--out``.
* ``train`` -- train a model and save an orbax checkpoint with its metadata.
* ``unlearn`` -- restore a checkpoint, remove a forget set with a method, save a new checkpoint whose
  deletion ledger has one more record (hash-chained; the ids themselves only with --record-ids).
* ``evaluate`` -- accuracies (and, given a forget set or a ledger, UA/RA/TA and MIA-Efficacy) of a
  checkpoint.
* ``verify`` -- recompute every digest of a checkpoint (files, arrays, metadata) and its ledger's
  hash chain; exit status 1 and the first mismatch if anything does not check out.

Every argument is checked before any training starts; a bad one ends the command with one line on
stderr that names the value and what is expected (exit status 2), and leaves existing checkpoints
as they were. ``unlearn`` and ``evaluate`` refuse checkpoints that do not verify. No library logic
lives here: each command parses its arguments and calls the library.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import pathlib
import sys
import uuid
from typing import Any

import jax
import numpy as np
import optax

DEFAULT_RUNS = pathlib.Path("runs")
EXIT_USAGE = 2  # bad arguments, unusable files, a checkpoint that does not verify
EXIT_UNVERIFIED = 1  # `verify` found a mismatch


class CliError(Exception):
    """A user error: printed as one ``error: ...`` line, exit status 2."""


def _one_line(error: BaseException) -> str:
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


def _timestamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


# ---------------------------------------------------------------------------------------- arguments
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, 1)


def _non_negative_int(text: str) -> int:
    return _integer(text, 0)


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["beta=0.2", "lr=1e-3"]`` -> ``{"beta": 0.2, "lr": 0.001}`` (JSON values, else strings)."""
    out = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0]:
            raise CliError(f"--set expects KEY=VALUE, got {item!r}.")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _log(quiet: bool):
    return (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))


# ---------------------------------------------------------------------------------------- output
class _Output:
    """The output directory of a command: new or empty, writable, outside every checkpoint.

    Claimed (created) before any training; removed again if the command fails while it is still
    empty, so a failed command leaves nothing behind.
    """

    def __init__(self, path: str | None, kind: str, *, source: pathlib.Path | None = None):
        self.path = pathlib.Path(path) if path else DEFAULT_RUNS / f"{kind}-{_timestamp()}"
        self.created: list[pathlib.Path] = []  # the directories this command made, deepest first
        self._check(source)
        self._claim()

    def _check(self, source: pathlib.Path | None) -> None:
        from unlearn_jax import checkpoint

        out = pathlib.Path(os.path.abspath(self.path))
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise CliError(f"--out {self.path} is a file; expected a new or empty directory.")
            if any(out.iterdir()):
                raise CliError(
                    f"--out {self.path} already exists and is not empty; it is never overwritten. "
                    "Pass a new --out (or omit --out for a fresh timestamped directory)."
                )
        ancestor = out.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise CliError(
                f"--out {self.path} lies under {ancestor}, which is a file; expected a directory "
                "path."
            )
        if source is not None:
            source = pathlib.Path(os.path.abspath(source))
            if out == source or source in out.parents:
                raise CliError(
                    f"--out {self.path} lies inside the checkpoint being read ({source}); write "
                    "the new checkpoint outside it."
                )
        for parent in [out, *out.parents]:
            if parent.is_dir() and checkpoint.list_steps(parent):
                raise CliError(
                    f"--out {self.path} lies inside the checkpoint directory {parent}; choose a "
                    "path outside it."
                )

    def _claim(self) -> None:
        out = self.path
        missing = [p for p in [out, *out.parents] if not p.exists()]
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.created = missing
            probe = out / f".write-test-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            self.release()
            reason = err.strerror or type(err).__name__
            raise CliError(
                f"--out {self.path} cannot be written ({reason}); expected a directory this user "
                "may create and write."
            ) from None

    def release(self) -> None:
        """Removes the directories this command created, as long as they are empty."""
        for path in self.created:
            with contextlib.suppress(OSError):
                path.rmdir()  # fails, and is kept, unless empty


@contextlib.contextmanager
def _output(path: str | None, kind: str, *, source: pathlib.Path | None = None):
    out = _Output(path, kind, source=source)
    try:
        yield out.path
    except BaseException:
        out.release()
        raise


# ---------------------------------------------------------------------------------------- data/model
def _load_data(name: str, *, probe: bool = False):
    """``data.load(name)`` with unavailable data sets reported in one line."""
    from unlearn_jax import data

    kwargs = {"max_examples": 2} if probe and name.startswith(data.loaders.TFDS_PREFIX) else {}
    try:
        return data.load(name, **kwargs)
    except (RuntimeError, ImportError) as err:
        raise CliError(f"--data {name!r} cannot be loaded: {_one_line(err)}") from None


def _check_model_data(model, splits, what: str) -> None:
    """The model is of the data's kind, takes its inputs and has an output for every label."""
    from unlearn_jax.models import model_config, model_task

    name = model_config(model).get("name", type(model).__name__)
    kind = model_task(model).kind
    if kind != splits.kind:
        raise CliError(
            f"model {name!r} ({what}) is a {kind} model, but data {splits.name!r} is "
            f"{splits.kind}; choose a {splits.kind} model (e.g. 'mlp_regressor' for regression, "
            "'mlp' for classification)."
        )
    x = np.asarray(splits.train.x[:1])
    try:
        out = jax.eval_shape(lambda k: model.init_with_output(k, x)[0], jax.random.key(0))
    except Exception as err:
        raise CliError(
            f"model {name!r} ({what}) cannot take the inputs of data {splits.name!r} (one example "
            f"has shape {tuple(x.shape[1:])}): {_one_line(err)}"
        ) from None
    if splits.num_classes is None:
        return
    outputs = int(out.shape[-1])
    labels = [int(np.max(d.y)) for d in (splits.train, splits.test) if len(d)]
    top = max(labels)
    if top >= outputs or min(int(np.min(d.y)) for d in (splits.train, splits.test)) < 0:
        raise CliError(
            f"data {splits.name!r} has class labels up to {top}, but model {name!r} ({what}) has "
            f"{outputs} outputs; expected labels in [0, {outputs - 1}]."
        )


def _jsonable(value: Any) -> Any:
    """A JSON-safe copy for the ledger: anything JSON cannot hold is recorded by its ``repr``."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic | np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


# ---------------------------------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    if args.data == "facts":  # language models: their own benchmark (apps/lm_bench.py)
        return _cmd_lm_bench(args)
    from unlearn_jax import data, models
    from unlearn_jax.apps import bench

    config = bench.BenchConfig(
        data=args.data,
        model=args.model,
        forget=args.forget,
        methods=tuple(m for m in args.methods.split(",") if m),
        seeds=args.seeds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        forget_seed=args.forget_seed,
        sweep=args.sweep,
        shadows=args.shadows,
    )
    config.method_names()  # unknown names fail before any work
    probe = args.data.startswith(data.loaders.TFDS_PREFIX)
    splits = _load_data(args.data, probe=probe)
    if not probe:  # a probe of a TFDS set has too few examples for these checks
        num_outputs = splits.num_classes or int(np.prod(splits.train.y.shape[1:]) or 1)
        _check_model_data(models.get_model(args.model, num_outputs=num_outputs), splits, "--model")
        data.select_forget(splits.train, args.forget, seed=args.forget_seed)
    with _output(args.out, "bench") as out:
        record = bench.run_benchmark(config, progress=_log(args.quiet))
        paths = bench.write_outputs(record, out)
    print(bench.format_results_table(record))
    print(
        f"\nretrain: {record['training']['retrain_wall_time_s']:.2f} s; whole run "
        f"{record['wall_time_s']:.1f} s. Results: {paths['results']}"
    )
    return 0


def _cmd_lm_bench(args) -> int:
    """``bench --data facts``: TOFU's table on the fictitious facts (:mod:`unlearn_jax.apps.lm_bench`).

    --model, --forget, --seeds, --epochs, --batch-size and --lr left at their (image) defaults take
    the LM benchmark's own; --sweep, --shadows and --forget-seed do not apply.
    """
    from unlearn_jax.apps import lm_bench

    defaults, lm = vars(build_parser().parse_args(["bench"])), lm_bench.LMBenchConfig()
    unused = {"sweep": "--sweep", "shadows": "--shadows", "forget_seed": "--forget-seed"}
    for name, flag in unused.items():
        if getattr(args, name) != defaults[name]:
            raise CliError(f"{flag} does not apply to the language-model benchmark (--data facts).")

    def given(name: str, fallback: Any) -> Any:
        value = getattr(args, name)
        return fallback if value == defaults[name] else value

    config = lm_bench.LMBenchConfig(
        model=given("model", lm.model), forget=given("forget", lm.forget),
        methods=tuple(m for m in args.methods.split(",") if m), seeds=given("seeds", lm.seeds),
        epochs=given("epochs", lm.epochs), batch_size=given("batch_size", lm.batch_size),
        learning_rate=given("lr", lm.learning_rate),
    )  # fmt: skip
    config.validate()  # before any training; a bad value is one line
    with _output(args.out, "bench") as out:
        record = lm_bench.run_lm_benchmark(config, progress=_log(args.quiet))
        paths = lm_bench.write_lm_outputs(record, out)
    print(lm_bench.format_lm_table(record))
    print(
        f"\nretrain: {record['training']['retrain_wall_time_s']:.2f} s; whole run "
        f"{record['wall_time_s']:.1f} s. Results: {paths['results']}"
    )
    return 0


# ---------------------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    from unlearn_jax import checkpoint, models, training

    splits = _load_data(args.data)
    model = models.get_model(args.model, num_outputs=splits.num_classes or 1)
    _check_model_data(model, splits, "--model")
    task, optimizer = models.model_task(model), optax.adam(args.lr)
    with _output(args.out, "train") as out:
        result = training.train_original(
            model,
            task,
            splits.train.x[:1],
            optimizer,
            splits.train,
            epochs=args.epochs,
            batch_size=args.batch_size,
            init_key=jax.random.key(args.seed),
            data_key=jax.random.key(args.seed + 10_000),
            test=splits.test,
            progress=not args.quiet,
        )
        metadata = {
            "model": models.model_config(model),
            "data": args.data,
            "optimizer": {"name": "adam", "learning_rate": args.lr},
            "training": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "seed": args.seed,
                "wall_time_s": result.wall_time,
            },
            "history": result.history,
        }
        path = checkpoint.save_checkpoint(out, result.state, metadata)
    print(f"saved {path}; test accuracy {result.history['test_acc'][-1]:.4f}")
    return 0


# ---------------------------------------------------------------------------------------- unlearn
def _restore(directory: str):
    """The verified checkpoint: (state, metadata, ledger, splits, task)."""
    from unlearn_jax import checkpoint, models, training

    meta = checkpoint.read_metadata(directory)  # verifies the metadata and the ledger
    ledger = checkpoint.read_ledger(directory)
    try:
        cfg = dict(meta["model"])
        name = cfg.pop("name")
        data_name = meta["data"]
        learning_rate = meta["optimizer"]["learning_rate"]
    except (KeyError, TypeError) as err:
        raise CliError(
            f"checkpoint {directory} was not written by `unlearn-jax train`: its metadata lacks "
            f"{err} (expected 'model', 'data' and 'optimizer')."
        ) from None
    model = models.get_model(name, **cfg)
    splits = _load_data(data_name)
    _check_model_data(model, splits, f"from checkpoint {directory}")
    target = jax.eval_shape(
        lambda k: training.create_train_state(
            model, splits.train.x[:1], optax.adam(learning_rate), k
        ),
        jax.random.key(0),
    )
    state, meta = checkpoint.restore_checkpoint(directory, target)  # verifies every array
    return state, meta, ledger, splits, models.model_task(model)


def _deleted_ids(ledger, train) -> np.ndarray:
    """The ids every request of the ledger removed, each set checked against its recorded hash.

    A request's ids are its recorded ones, or else re-derived from its ``class:``/``random:`` spec
    on what was left of the training set at the time.
    """
    from unlearn_jax import data

    deleted = np.zeros((0,), np.int64)
    for record in ledger:
        if record.ids is not None:
            ids = np.asarray(record.ids, np.int64)
        elif (record.forget_spec or "").split(":")[0] in ("class", "random"):
            left = train.without_ids(deleted) if deleted.size else train
            ids = data.select_forget(left, record.forget_spec).forget.ids
        else:
            raise CliError(
                f"ledger request {record.index} ({record.request_id!r}, {record.forget_spec}) "
                "recorded only the SHA-256 of its ids, so the examples it removed are unknown; "
                "unlearn from the original checkpoint again with --record-ids (or choose the "
                "forget set with --forget class:K / random:F, which the ledger can re-derive)."
            )
        if data.forget_ids_hash(ids) != record.forget_ids_hash:
            raise CliError(
                f"the ids of ledger request {record.index} ({record.request_id!r}, "
                f"{record.forget_spec}) hash to {data.forget_ids_hash(ids)}, but the ledger "
                f"records {record.forget_ids_hash}: the data set is not the one it was applied to."
            )
        deleted = np.concatenate([deleted, ids])
    return deleted


def _forget_split(splits, args, ledger):
    """The forget/retain split of a request, minus what earlier requests already deleted.

    Explicit ids that an earlier request deleted are an error (the request is probably wrong); a
    spec (``class:3``) simply does not select them again.
    """
    from unlearn_jax import data

    earlier = _deleted_ids(ledger, splits.train)
    train = splits.train.without_ids(earlier) if earlier.size else splits.train
    if args.forget_ids:
        ids = data.read_ids_file(args.forget_ids)
        gone = np.intersect1d(ids, earlier)
        if gone.size:
            raise CliError(
                f"{gone.size} of the ids in {args.forget_ids} were deleted by an earlier request "
                f"already (e.g. {gone[:5].tolist()}); see the checkpoint's ledger "
                "(unlearn-jax verify)."
            )
        return data.ids_forget(train, ids)
    return data.select_forget(train, args.forget, seed=args.forget_seed)


def _guarantee(method, hparams: dict) -> tuple[str, float | None, float | None]:
    """The method's guarantee as the ledger records it (certified needs epsilon and delta)."""
    stated = getattr(method, "guarantee", "approximate")
    kind = stated if isinstance(stated, str) else getattr(stated, "kind", "approximate")
    if kind != "certified":
        return (kind if kind in ("exact", "approximate") else "approximate"), None, None
    epsilon = getattr(stated, "epsilon", None) if not isinstance(stated, str) else None
    delta = getattr(stated, "delta", None) if not isinstance(stated, str) else None
    epsilon = hparams.get("epsilon") if epsilon is None else epsilon
    delta = hparams.get("delta") if delta is None else delta
    if epsilon is None or delta is None:
        return "approximate", None, None  # a certificate without its parameters claims nothing
    return "certified", float(epsilon), float(delta)


def cmd_unlearn(args) -> int:
    from unlearn_jax import checkpoint, evaluation
    from unlearn_jax.apps import registry
    from unlearn_jax.methods import unlearn

    if not (args.forget_ids or args.forget):
        raise CliError("give the examples to forget with --forget-ids FILE or --forget SPEC.")
    # The registry's settings for the spec's kind (class or random); --forget-ids: the base.
    method, run_kwargs = registry.build(
        args.method, scenario=args.forget, **_parse_overrides(args.set)
    )
    state, meta, ledger, splits, task = _restore(args.checkpoint)
    split = _forget_split(splits, args, ledger)
    if args.request_id is not None and any(r.request_id == args.request_id for r in ledger):
        raise CliError(f"--request-id {args.request_id!r} is already in the checkpoint's ledger.")
    before = checkpoint.checkpoint_digest(state, meta)
    with _output(args.out, "unlearn", source=pathlib.Path(args.checkpoint)) as out:
        result = unlearn(
            method,
            state,
            task,
            split.forget,
            split.retain,
            key=jax.random.key(args.seed),
            progress=not args.quiet,
            **run_kwargs,
        )
        metrics = evaluation.evaluate_unlearning(
            task, result.state.params, forget=split.forget, retain=split.retain, test=splits.test
        )
        metrics = {k: float(metrics[k]) for k in ("UA", "RA", "TA", "MIA-Efficacy")}
        guarantee, epsilon, delta = _guarantee(method, result.hparams)
        ledger = ledger.append(
            split.forget.ids,
            method=result.method,
            before=before,
            after=checkpoint.checkpoint_digest(result.state, meta),
            guarantee=guarantee,
            epsilon=epsilon,
            delta=delta,
            config={**_jsonable(result.hparams), "seed": args.seed},
            metrics={**metrics, "wall_time_s": result.wall_time},
            request_id=args.request_id,
            forget_spec=split.spec,
            record_ids=args.record_ids,
        )
        path = checkpoint.save_checkpoint(
            out, result.state, meta, step=int(np.asarray(result.state.step)), ledger=ledger
        )
    print(
        evaluation.format_table([{"method": result.method, **metrics, "time_s": result.wall_time}])
    )
    print(
        f"saved {path} (ledger: {len(ledger)} request(s); head {ledger.head_hash}; ids "
        f"{'recorded' if args.record_ids else 'not recorded, only their SHA-256'})"
    )
    return 0


# ---------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args) -> int:
    """Evaluates against ``--forget``/``--forget-ids`` if given, else against the ledger."""
    from unlearn_jax import data, evaluation

    state, _, ledger, splits, task = _restore(args.checkpoint)
    if args.forget_ids:
        split = data.ids_forget(splits.train, data.read_ids_file(args.forget_ids))
    elif args.forget:
        split = data.select_forget(splits.train, args.forget, seed=args.forget_seed)
    elif len(ledger):
        split = data.ids_forget(splits.train, _deleted_ids(ledger, splits.train))
    else:
        split = None
    if split is None:
        metrics = evaluation.accuracy_metrics(
            task, state.params, forget=None, retain=splits.train, test=splits.test
        )
    else:
        metrics = evaluation.evaluate_unlearning(
            task, state.params, forget=split.forget, retain=split.retain, test=splits.test
        )
        metrics["forget_spec"] = split.spec
    metrics["deletions"] = len(ledger)
    metrics["ledger_head"] = ledger.head_hash
    print(json.dumps(evaluation.to_jsonable(metrics), indent=2, sort_keys=True))
    return 0


# ---------------------------------------------------------------------------------------- verify
def cmd_verify(args) -> int:
    from unlearn_jax import checkpoint

    try:
        report = checkpoint.verify_checkpoint(args.checkpoint, args.step, anchor=args.anchor)
    except checkpoint.CheckpointCorruptedError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_UNVERIFIED
    ledger = report.ledger
    print(f"verified {report.path} (step {report.step}, save generation {report.generation})")
    print(f"  {report.files} files and {report.arrays} arrays match their SHA-256")
    print(f"  digest (arrays + metadata): {report.digest}")
    if len(ledger):
        kinds = ", ".join(sorted({r.guarantee for r in ledger}))
        print(
            f"  ledger: {len(ledger)} request(s) ({kinds}), hash chain intact, head "
            f"{ledger.head_hash}"
        )
        if args.anchor:
            print(f"  anchor {args.anchor} is in the chain")
        if not report.matches_ledger:
            print(
                f"  note: the model is not the one the last request ({ledger.head.request_id!r}) "
                f"produced ({ledger.head.checkpoint_after}): it changed after that deletion"
            )
        for k in report.gaps:
            print(
                f"  note: request {k} ({ledger[k].request_id!r}) started from another model than "
                f"request {k - 1} produced"
            )
    else:
        print("  ledger: empty (no deletion requests)")
    return 0


# ---------------------------------------------------------------------------------------- parser
def default_cache_dir() -> str:
    """JAX's persistent compilation cache of the command line: ``$UNLEARN_JAX_CACHE_DIR``, else
    ``unlearn_jax/xla`` under the user's cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    if os.environ.get("UNLEARN_JAX_CACHE_DIR"):
        return os.environ["UNLEARN_JAX_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "unlearn_jax", "xla")


def enable_compilation_cache(directory: str) -> None:
    """Switches on JAX's persistent compilation cache in ``directory``: a later command compiles
    nothing it compiled before (the training step, each method's update, the statistics passes).
    A library never does this itself; the command line does, unless ``--no-cache``."""
    import jax

    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # Every program that took a noticeable time to compile; tiny ones are cheaper to recompile.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="unlearn-jax", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache-dir", default=None,
        help="JAX's persistent compilation cache (default: $UNLEARN_JAX_CACHE_DIR or "
        "~/.cache/unlearn_jax/xla)",
    )  # fmt: skip
    parser.add_argument(
        "--no-cache", action="store_true", help="do not use the persistent compilation cache"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="run the unlearning benchmark (the main job)")
    b.add_argument("--data", default="digits")
    b.add_argument("--model", default="mlp")
    b.add_argument(
        "--forget", default="random:0.1", help="class:K | random:FRACTION | ids:FILE | ids:1,2,3"
    )
    b.add_argument(
        "--methods",
        default="all",
        help="'all' or a comma-separated list; the matching methods (oracle_matching, dmm) are "
        "not in 'all': name them",
    )
    b.add_argument(
        "--seeds",
        type=_positive_int,
        default=32,
        help="models per side for KLoM and the challenge score (originals, oracles, reference oracles)",
    )
    b.add_argument(
        "--shadows", type=_non_negative_int, default=8, help="LiRA shadow models (0: no LiRA)"
    )
    b.add_argument("--epochs", type=_positive_int, default=30)
    b.add_argument("--batch-size", type=_positive_int, default=64)
    b.add_argument("--lr", type=_learning_rate, default=1e-3)
    b.add_argument("--forget-seed", type=_non_negative_int, default=0)
    b.add_argument(
        "--sweep",
        action="store_true",
        help="grid-search each method's hyper-parameters on a validation forget set",
    )
    b.add_argument("--out", default=None, help="output directory (default runs/bench-<time>)")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("train", help="train a model and save a checkpoint")
    t.add_argument("--data", default="digits")
    t.add_argument("--model", default="mlp")
    t.add_argument("--epochs", type=_positive_int, default=30)
    t.add_argument("--batch-size", type=_positive_int, default=64)
    t.add_argument("--lr", type=_learning_rate, default=1e-3)
    t.add_argument("--seed", type=_non_negative_int, default=0)
    t.add_argument("--out", default=None, help="a new directory (default runs/train-<time>)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    for name, func, help_ in (
        ("unlearn", cmd_unlearn, "remove a forget set from a checkpoint"),
        ("evaluate", cmd_evaluate, "evaluate a checkpoint"),
    ):
        u = sub.add_parser(name, help=help_)
        u.add_argument("--checkpoint", required=True, help="a checkpoint directory")
        which = u.add_mutually_exclusive_group()
        which.add_argument("--forget-ids", default=None, help="file of ids (text or JSON list)")
        which.add_argument("--forget", default=None, help="or a forget spec (class:K, random:F)")
        u.add_argument("--forget-seed", type=_non_negative_int, default=0)
        if name == "unlearn":
            u.add_argument("--method", required=True)
            u.add_argument(
                "--set",
                action="append",
                metavar="KEY=VALUE",
                help="override a hyper-parameter (repeatable)",
            )
            u.add_argument("--seed", type=_non_negative_int, default=0)
            u.add_argument(
                "--record-ids",
                action="store_true",
                help="store the forgotten ids in the ledger (default: only their SHA-256 and "
                "count; later requests and `evaluate` then need them re-derivable from a "
                "class:/random: spec)",
            )
            u.add_argument("--request-id", default=None, help="a reference for the request")
            u.add_argument(
                "--out", default=None, help="a new directory (default runs/unlearn-<time>)"
            )
            u.add_argument("--quiet", action="store_true")
        u.set_defaults(func=func)

    v = sub.add_parser(
        "verify", help="recompute every digest of a checkpoint and its deletion ledger"
    )
    v.add_argument("--checkpoint", required=True, help="a checkpoint directory")
    v.add_argument("--step", type=_non_negative_int, default=None, help="default: the latest")
    v.add_argument(
        "--anchor",
        default=None,
        help="a ledger record hash published earlier: fail unless the chain still holds it",
    )
    v.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from unlearn_jax.checkpoint import CheckpointError

    try:
        # UNLEARN_JAX_CACHE=off disables it too (the test suite does, to keep JAX's config local).
        if not args.no_cache and os.environ.get("UNLEARN_JAX_CACHE", "on") != "off":
            enable_compilation_cache(args.cache_dir or default_cache_dir())
        return args.func(args)
    except (CliError, ValueError, OSError, CheckpointError, FloatingPointError) as error:
        # Library errors name the problem and how to fix it: one line, no traceback.
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
