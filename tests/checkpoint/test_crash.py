"""Saves killed at every step of the save and of its cleanup, twice in a row.

The directory protocol (:mod:`unlearn_jax.checkpoint._layout`) is loaded on its own in a fresh
process (it needs only the standard library), which forks one child per kill: the child counts its
file-system changes (mkdir, rename, unlink, rmdir, creating or opening a file for writing) and calls
``os._exit`` just before the k-th, with no exception handler or cleanup running. For every first kill
point, a second save is killed at every one of its points; after each kill a reader must find, for
every step, exactly the last save whose commit marker was renamed into place, and the next save must
finish the cleanup. The same protocol runs under :func:`save_checkpoint`, checked end to end with
orbax in ``test_store.py``.
"""

import json
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAYOUT = ROOT / "unlearn_jax" / "checkpoint" / "_layout.py"

SCRIPT = textwrap.dedent(
    r"""
    import hashlib, importlib.util, json, os, pathlib, shutil, sys, tempfile

    spec = importlib.util.spec_from_file_location("_layout", sys.argv[1])
    layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout)
    FMT, KILLED = "test/1", 77
    # The file-system changes a kill can fall between (a write into a file just created changes
    # nothing a reader of complete copies sees, so files count once, when created).
    REAL = {n: getattr(os, n) for n in ("mkdir", "rename", "replace", "unlink", "rmdir", "open")}
    PIPE_WRITE = os.write
    WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def writer(version):
        def write(staging, generation):
            payload = json.dumps({"version": version, "generation": generation}).encode()
            layout.write_file(staging / "payload", payload)
            return hashlib.sha256(payload).hexdigest()
        return write

    def save(root, version, step=1):
        layout.save(root, step, FMT, writer(version), overwrite=True)

    def read(root):
        # What a reader gets: step -> version of the copy it would read.
        return {s: json.loads((c.path / "payload").read_bytes())["version"]
                for s, c in layout.winners(root, FMT).items()}

    def shape(root):
        names = sorted(os.listdir(root))
        return [n.split("-")[0] + "-" if n.startswith(".") else n for n in names]

    def killed_save(root, version, kill_at):
        # A child saves `version` and dies just before its kill_at-th file-system change.
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            count = 0
            def wrap(name):
                real = REAL[name]
                def op(*args, **kwargs):
                    nonlocal count
                    if name == "open":
                        flags = args[1] if len(args) > 1 else kwargs.get("flags", 0)
                        if not flags & WRITING:
                            return real(*args, **kwargs)
                    count += 1
                    if count == kill_at:
                        os._exit(KILLED)
                    out = real(*args, **kwargs)
                    if name == "rename" and str(args[1]).endswith("/" + layout.MARKER):
                        PIPE_WRITE(w, b"c")  # the commit point has passed
                    return out
                return op
            for name in REAL:
                setattr(os, name, wrap(name))
            try:
                save(root, version)
            except BaseException:
                os._exit(1)
            os._exit(0)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        committed = os.read(r, 1) == b"c"
        os.close(r)
        code = os.waitstatus_to_exitcode(status)
        assert code in (0, KILLED), code
        return code == 0, committed

    base = pathlib.Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    pristine = base / "pristine"
    save(pristine, 1)
    save(pristine, 100, step=2)  # another step, which no save below may disturb
    failures, firsts, pairs = [], [], 0
    i = 0
    while True:
        i += 1
        first = base / f"first-{i}"
        shutil.copytree(pristine, first)
        done1, committed1 = killed_save(first, 2, i)
        want1 = {1: 2 if committed1 else 1, 2: 100}
        if read(first) != want1:
            failures.append(f"kill {i}: read {read(first)}, expected {want1}")
        firsts.append({"committed": committed1, "shape": shape(first)})
        j = 0
        while True:
            j += 1
            pairs += 1
            second = base / f"second-{i}-{j}"
            shutil.copytree(first, second)
            done2, committed2 = killed_save(second, 3, j)
            want2 = {1: 3 if committed2 else want1[1], 2: 100}
            if read(second) != want2:
                failures.append(f"kills {i}, {j}: read {read(second)}, expected {want2}")
            save(second, 4)  # the next save finishes the cleanup
            if read(second) != {1: 4, 2: 100} or sorted(os.listdir(second)) != ["1", "2"]:
                failures.append(f"kills {i}, {j}, then a save: {sorted(os.listdir(second))}")
            if done2:
                break
        if done1:
            break
    shutil.rmtree(base)
    print(json.dumps({"failures": failures, "firsts": firsts, "pairs": pairs}))
    """
)


def test_two_kills_in_a_row_at_every_step_keep_the_last_committed_save(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(LAYOUT)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["failures"] == []
    firsts = result["firsts"]
    # Every first kill point was followed by a second save killed at each of its points.
    assert len(firsts) >= 10 and result["pairs"] >= len(firsts) ** 2 // 2
    # The kills covered the states behind the four failures once seen: before the commit point,
    # between it and the rename, with the old copy renamed to the trash but the new one not yet in
    # place, and with the trash partly deleted.
    shapes = {(f["committed"], tuple(f["shape"])) for f in firsts}
    assert (False, (".staging-", "1", "2")) in shapes
    assert (True, (".staging-", "1", "2")) in shapes
    assert (True, (".staging-", ".trash-", "2")) in shapes
    assert (True, (".trash-", "1", "2")) in shapes
    assert sum(not f["committed"] for f in firsts) >= 4
