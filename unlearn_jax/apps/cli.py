"""``unlearn-jax``: the command-line tool (also ``python -m unlearn_jax``).

Sub-commands:

* ``bench`` -- the main job: originals, retrained oracles, every method, every metric; prints one
  table and writes ``results.json``, ``table.txt`` and plots to ``--out``.
* ``train`` -- train a model and save an orbax checkpoint with its metadata.
* ``unlearn`` -- restore a checkpoint, remove a forget set with a method, save a new checkpoint whose
  metadata appends the request to the model's deletion record.
* ``evaluate`` -- accuracies (and, given a forget set, UA/RA/TA and MIA-Efficacy) of a checkpoint.

No library logic lives here: each command parses its arguments and calls the library.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
from typing import Any

import jax
import numpy as np
import optax

DEFAULT_RUNS = pathlib.Path("runs")


def _timestamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def _fresh_dir(path: str | None, kind: str) -> pathlib.Path:
    """The output directory: a new timestamped one by default; an existing one is never reused."""
    out = pathlib.Path(path) if path else DEFAULT_RUNS / f"{kind}-{_timestamp()}"
    if out.exists() and any(out.iterdir()):
        raise SystemExit(
            f"error: output directory {out} already exists and is not empty; it is never overwritten. "
            "Pass a new --out (or omit --out for a fresh timestamped directory)."
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["beta=0.2", "lr=1e-3"]`` -> ``{"beta": 0.2, "lr": 0.001}`` (JSON values, else strings)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"error: --set expects KEY=VALUE, got {item!r}.")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _log(quiet: bool):
    return (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))


# ---------------------------------------------------------------------------------------- bench
def cmd_bench(args) -> int:
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
    out = _fresh_dir(args.out, "bench")
    record = bench.run_benchmark(config, progress=_log(args.quiet))
    paths = bench.write_outputs(record, out)
    print(bench.format_results_table(record))
    print(
        f"\nretrain: {record['training']['retrain_wall_time_s']:.2f} s; whole run "
        f"{record['wall_time_s']:.1f} s. Results: {paths['results']}"
    )
    return 0


# ---------------------------------------------------------------------------------------- train
def _build(model_name: str, data_name: str, lr: float):
    from unlearn_jax import data, models

    splits = data.load(data_name)
    num_outputs = splits.num_classes or 1
    model = models.get_model(model_name, num_outputs=num_outputs)
    return splits, model, models.model_task(model), optax.adam(lr)


def cmd_train(args) -> int:
    from unlearn_jax import checkpoint, models, training

    splits, model, task, optimizer = _build(args.model, args.data, args.lr)
    out = _fresh_dir(args.out, "train")
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
        "deletions": [],
    }
    path = checkpoint.save_checkpoint(out, result.state, metadata)
    print(f"saved {path}; test accuracy {result.history['test_acc'][-1]:.4f}")
    return 0


# ---------------------------------------------------------------------------------------- unlearn
def _restore(directory: str):
    from unlearn_jax import checkpoint, data, models, training

    meta = checkpoint.read_metadata(directory)
    cfg = dict(meta["model"])
    name = cfg.pop("name")
    model = models.get_model(name, **cfg)
    splits = data.load(meta["data"])
    optimizer = optax.adam(meta["optimizer"]["learning_rate"])
    task = models.model_task(model)
    target = training.create_train_state(model, splits.train.x[:1], optimizer, jax.random.key(0))
    state, meta = checkpoint.restore_checkpoint(directory, target)
    return state, meta, splits, task


def _forget_split(splits, args, meta):
    """The forget/retain split of a request, minus what earlier requests already deleted.

    Explicit ids that an earlier request deleted are an error (the request is probably wrong); a
    spec (``class:3``) simply does not select them again.
    """
    from unlearn_jax import data

    earlier = np.asarray([i for d in meta.get("deletions", []) for i in d.get("ids", [])], np.int64)
    train = splits.train.without_ids(earlier) if earlier.size else splits.train
    if args.forget_ids:
        ids = data.read_ids_file(args.forget_ids)
        gone = np.intersect1d(ids, earlier)
        if gone.size:
            raise ValueError(
                f"{gone.size} of the ids to forget were deleted by an earlier request already "
                f"(e.g. {gone[:5].tolist()}); see the checkpoint's deletion record."
            )
        return data.ids_forget(train, ids)
    if args.forget:
        return data.select_forget(train, args.forget, seed=args.forget_seed)
    return None


def cmd_unlearn(args) -> int:
    from unlearn_jax import checkpoint, data, evaluation
    from unlearn_jax.apps import registry
    from unlearn_jax.methods import unlearn

    method, run_kwargs = registry.build(args.method, **_parse_overrides(args.set))
    state, meta, splits, task = _restore(args.checkpoint)
    split = _forget_split(splits, args, meta)
    if split is None:
        raise SystemExit(
            "error: give the examples to forget with --forget-ids FILE or --forget SPEC."
        )
    out = _fresh_dir(args.out, "unlearn")
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
    request = {
        "method": result.method,
        "hparams": result.hparams,
        "forget_spec": split.spec,
        "count": len(split.forget),
        "forget_ids_hash": data.forget_ids_hash(split.forget.ids),
        "ids": split.forget.ids.tolist(),
        "wall_time_s": result.wall_time,
        "applied_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "metrics": {k: metrics[k] for k in ("UA", "RA", "TA", "MIA-Efficacy")},
    }
    meta = dict(meta, deletions=[*meta.get("deletions", []), request])
    path = checkpoint.save_checkpoint(
        out, result.state, meta, step=int(np.asarray(result.state.step))
    )
    print(
        evaluation.format_table(
            [{"method": result.method, **request["metrics"], "time_s": result.wall_time}]
        )
    )
    print(f"saved {path} (deletion record: {len(meta['deletions'])} request(s))")
    return 0


# ---------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args) -> int:
    """Evaluates against ``--forget``/``--forget-ids`` if given, else against the deletion record."""
    from unlearn_jax import data, evaluation

    state, meta, splits, task = _restore(args.checkpoint)
    deleted = [i for d in meta.get("deletions", []) for i in d.get("ids", [])]
    if args.forget_ids:
        split = data.ids_forget(splits.train, data.read_ids_file(args.forget_ids))
    elif args.forget:
        split = data.select_forget(splits.train, args.forget, seed=args.forget_seed)
    elif deleted:
        split = data.ids_forget(splits.train, deleted)
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
    metrics["deletions"] = len(meta.get("deletions", []))
    print(json.dumps(evaluation.to_jsonable(metrics), indent=2, sort_keys=True))
    return 0


# ---------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearn-jax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="run the unlearning benchmark (the main job)")
    b.add_argument("--data", default="digits")
    b.add_argument("--model", default="mlp")
    b.add_argument(
        "--forget", default="random:0.1", help="class:K | random:FRACTION | ids:FILE | ids:1,2,3"
    )
    b.add_argument("--methods", default="all", help="'all' or a comma-separated list")
    b.add_argument("--seeds", type=int, default=8, help="originals / oracles (for KLoM)")
    b.add_argument("--shadows", type=int, default=8, help="LiRA shadow models (0: no LiRA)")
    b.add_argument("--epochs", type=int, default=30)
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--lr", type=float, default=1e-3)
    b.add_argument("--forget-seed", type=int, default=0)
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
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    for name, func, help_ in (
        ("unlearn", cmd_unlearn, "remove a forget set from a checkpoint"),
        ("evaluate", cmd_evaluate, "evaluate a checkpoint"),
    ):
        u = sub.add_parser(name, help=help_)
        u.add_argument("--checkpoint", required=True)
        u.add_argument("--forget-ids", default=None, help="file of ids (text or JSON list)")
        u.add_argument("--forget", default=None, help="or a forget spec (class:K, random:F)")
        u.add_argument("--forget-seed", type=int, default=0)
        if name == "unlearn":
            u.add_argument("--method", required=True)
            u.add_argument(
                "--set",
                action="append",
                metavar="KEY=VALUE",
                help="override a hyper-parameter (repeatable)",
            )
            u.add_argument("--seed", type=int, default=0)
            u.add_argument("--out", default=None)
            u.add_argument("--quiet", action="store_true")
        u.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from unlearn_jax.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError) as error:
        # Library errors name the problem and how to fix it: show them without a traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
