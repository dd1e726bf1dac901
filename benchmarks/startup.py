"""How fast is a pool when it is new, when it loses a worker, and when items are slow? (issue 15)

Three questions, stagepool and its peers side by side in one run, each row in a fresh interpreter
(``benchmarks/fresh.py``: round-robin repeats, bytecode cached as for an installed package):

* ``startup``: script start to the first result of 10 trivial items on 2 workers (imports, pool
  creation, worker start, one round trip): what a short script, CLI tool or test pays every run.
* ``respawn``: one worker; an item hangs and is killed at its 0.5 s limit (peers without
  per-task limits: the worker dies at that moment); seconds from that deadline until the next
  item starts on the replacement. The stage module imports numpy and scipy.signal, as a media
  stage does. The reference row is the physical floor: a process forked (``multiprocessing``
  fork context) from a parent that already imported the module.
* ``slow``: a warm pool, 12 items of 0.3 s each on 2 workers, consumed in order as they come:
  when the first outcome arrives (in items' time) and the largest burst (outcomes arriving
  within 50 ms of each other; 2 workers finishing together make 2).

    python -m benchmarks.startup [--only startup,respawn,slow] [--repeat 5] [--out DIR]

Prints a table per question and writes ``startup.json``. Targets (issue 15): startup within
1.2x ProcessPoolExecutor(spawn); respawn within 2x the fork reference; slow: first outcome
within 2x one item's time, bursts of at most the worker count.
"""

from __future__ import annotations

import argparse
import textwrap

from .fresh import Row, median_table, run_rows, write_json

# ---- start-up -------------------------------------------------------------------------------

_FIRST = """
import time
T0 = time.perf_counter()
@SETUP@
first = @FIRST@
T1 = time.perf_counter()
assert first == 0, first
@CLOSE@
import json
print(json.dumps({"first_s": T1 - T0}))
"""


def _startup_row(name: str, what: str, setup: str, first: str, close: str) -> Row:
    code = (_FIRST.replace("@SETUP@", textwrap.dedent(setup).strip())
            .replace("@FIRST@", first).replace("@CLOSE@", textwrap.dedent(close).strip()))
    return Row(name, what, code)


def _ppe(method: str) -> Row:
    return _startup_row(
        f"ppe-{method}", f"ProcessPoolExecutor({method}) map",
        f"import concurrent.futures as cf, multiprocessing as mp\n"
        f"ex = cf.ProcessPoolExecutor(2, mp_context=mp.get_context({method!r}))",
        "next(ex.map(abs, range(10)))", "ex.shutdown()")


def _mp(method: str) -> Row:
    return _startup_row(
        f"mp.Pool-{method}", f"multiprocessing.Pool({method}) imap",
        f"import multiprocessing as mp\npool = mp.get_context({method!r}).Pool(2)",
        "next(pool.imap(abs, range(10)))", "pool.terminate()")


STARTUP_ROWS = [
    _startup_row("stagepool", "Engine(workers=2) imap",
                 "import stagepool as sp\nengine = sp.Engine(workers=2)",
                 "next(engine.imap(abs, range(10))).unwrap()", "engine.shutdown()"),
    _ppe("spawn"), _ppe("fork"), _ppe("forkserver"), _mp("fork"), _mp("spawn"),
    _startup_row("loky", "get_reusable_executor(2) map",
                 "from loky import get_reusable_executor\nex = get_reusable_executor(2)",
                 "next(ex.map(abs, range(10)))", "ex.shutdown()"),
    _startup_row("joblib", "Parallel(2, return_as='generator')",
                 "from joblib import Parallel, delayed\n"
                 "gen = Parallel(n_jobs=2, return_as='generator')(delayed(abs)(i) for i in range(10))",
                 "next(gen)", "list(gen)"),
    _startup_row("mpire", "WorkerPool(2) imap",
                 "from mpire import WorkerPool\npool = WorkerPool(n_jobs=2)",
                 "next(pool.imap(abs, range(10)))", "pool.terminate()"),
    _startup_row("pebble", "ProcessPool(2) map",
                 "from pebble import ProcessPool\npool = ProcessPool(max_workers=2)",
                 "next(pool.map(abs, range(10)).result())", "pool.stop()\npool.join()"),
    _startup_row("dask", "LocalCluster(2 processes) client.map",
                 "from distributed import Client, LocalCluster\n"
                 "cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,"
                 " dashboard_address=None)\nclient = Client(cluster)",
                 "client.map(abs, range(10), pure=False)[0].result()",
                 "client.close()\ncluster.close()"),
]

# ---- respawn --------------------------------------------------------------------------------

def _respawn_row(name: str, what: str, body: str) -> Row:
    code = textwrap.dedent("""
        import json, os, tempfile, time
        from benchmarks import _heavy_stage as hs
        path = tempfile.mktemp(prefix="stagepool-bench-")
        def deadline():
            with open(path) as f:
                return float(f.read()) + hs.TIMEOUT
        """) + textwrap.dedent(body) + textwrap.dedent("""
        respawn_s = probe - deadline()
        os.unlink(path)
        print(json.dumps({"respawn_s": respawn_s, "heavy": hs.HEAVY}))
        """)
    return Row(name, what, code)


def _stagepool_respawn(name: str, what: str, preload: tuple[str, ...]) -> Row:
    return _respawn_row(name, what, f"""
        import stagepool as sp
        with sp.Engine(workers=1, timeout=hs.TIMEOUT, preload={preload!r}) as engine:
            engine.map(hs.hang_or_probe, ["warm"])
            out = list(engine.imap(hs.hang_or_probe, ["hang:" + path, "probe"], chunk_size=1))
            assert out[0].kind == "timeout", out[0]
            probe = out[1].unwrap()
        """)


def _broken_executor_row(name: str, what: str, make: str) -> Row:
    return _respawn_row(name, what, f"""
        import concurrent.futures as cf, multiprocessing as mp
        ex = {make}
        ex.submit(hs.hang_or_probe, "warm").result()
        try:
            ex.submit(hs.die_at_deadline, path).result()
        except Exception:
            pass  # the pool is broken: make a new one, as a user must
        ex.shutdown(wait=False)
        ex = {make}
        probe = ex.submit(hs.hang_or_probe, "probe").result()
        ex.shutdown()
        """)


RESPAWN_ROWS = [
    _respawn_row("fork reference", "a fresh fork of a parent that imported the stage", """
        import multiprocessing as mp
        ctx = mp.get_context("fork")
        queue = ctx.SimpleQueue()
        with open(path, "w") as f:
            f.write(repr(time.monotonic() - hs.TIMEOUT))
        process = ctx.Process(target=hs.probe_to, args=(queue,))
        process.start()
        probe = queue.get()
        process.join()
        """),
    _stagepool_respawn("stagepool preload", "Engine(timeout=0.5, preload=(stage,))",
                       ("benchmarks._heavy_stage",)),
    _stagepool_respawn("stagepool", "Engine(timeout=0.5), no preload", ()),
    _respawn_row("pebble", "ProcessPool.schedule(timeout=0.5): its own restart (fork)", """
        from pebble import ProcessPool
        pool = ProcessPool(max_workers=1)
        pool.schedule(hs.hang_or_probe, args=("warm",)).result()
        hung = pool.schedule(hs.hang_or_probe, args=("hang:" + path,), timeout=hs.TIMEOUT)
        probe = pool.schedule(hs.hang_or_probe, args=("probe",)).result()
        assert isinstance(hung.exception(), TimeoutError)
        pool.stop()
        pool.join()
        """),
    _respawn_row("mp.Pool-fork", "Pool(1): a dead worker replaced by its handler", """
        import multiprocessing as mp
        pool = mp.get_context("fork").Pool(1)
        pool.apply(hs.hang_or_probe, ("warm",))
        pool.apply_async(hs.die_at_deadline, (path,))  # its result is lost with the worker
        probe = pool.apply_async(hs.hang_or_probe, ("probe",)).get(120)
        pool.terminate()
        """),
    _broken_executor_row("loky", "worker died: get_reusable_executor() again",
                         "__import__('loky').get_reusable_executor(1)"),
    _broken_executor_row("ppe-fork", "BrokenProcessPool: a new executor",
                         "cf.ProcessPoolExecutor(1, mp_context=mp.get_context('fork'))"),
    _broken_executor_row("ppe-spawn", "BrokenProcessPool: a new executor",
                         "cf.ProcessPoolExecutor(1, mp_context=mp.get_context('spawn'))"),
]

# ---- slow items -----------------------------------------------------------------------------

ITEM_S, N_SLOW = 0.3, 12


def _slow_row(name: str, what: str, setup: str, warm: str, stream: str, close: str) -> Row:
    code = textwrap.dedent(setup).strip() + "\n" + textwrap.dedent(f"""
        import json, time
        items = [{ITEM_S}] * {N_SLOW}
        {warm}
        T0 = time.monotonic()
        arrivals = []
        for _ in {stream}:
            arrivals.append(time.monotonic() - T0)
        assert len(arrivals) == {N_SLOW}, arrivals
        burst = max(sum(1 for b in arrivals if 0 <= b - a < 0.05) for a in arrivals)
        print(json.dumps({{"first_s": arrivals[0], "first_items": arrivals[0] / {ITEM_S},
                          "burst": burst, "total_s": arrivals[-1]}}))
        """) + textwrap.dedent(close)
    return Row(name, what, code)


SLOW_ROWS = [
    _slow_row("stagepool", "Engine(workers=2).imap (chunk_size auto)",
              "import stagepool as sp\nengine = sp.Engine(workers=2)",
              "engine.map(abs, [1])", "engine.imap(time.sleep, items)", "engine.shutdown()"),
    _slow_row("ppe", "ProcessPoolExecutor.map (chunksize 1)",
              "import concurrent.futures as cf\nex = cf.ProcessPoolExecutor(2)",
              "list(ex.map(abs, [1, 2]))", "ex.map(time.sleep, items)", "ex.shutdown()"),
    _slow_row("mp.Pool", "Pool.imap (chunksize 1)",
              "import multiprocessing as mp\npool = mp.Pool(2)",
              "pool.map(abs, [1, 2])", "pool.imap(time.sleep, items)", "pool.terminate()"),
    _slow_row("mp.Pool map", "Pool.map_async (its automatic chunksize)",
              "import multiprocessing as mp\npool = mp.Pool(2)",
              "pool.map(abs, [1, 2])", "pool.map_async(time.sleep, items).get()",
              "pool.terminate()"),
    _slow_row("loky", "executor.map (chunksize 1)",
              "from loky import get_reusable_executor\nex = get_reusable_executor(2)",
              "list(ex.map(abs, [1, 2]))", "ex.map(time.sleep, items)", "ex.shutdown()"),
    _slow_row("joblib", "Parallel(2, return_as='generator'), batch_size auto",
              "from joblib import Parallel, delayed\npar = Parallel(n_jobs=2, return_as='generator')",
              "list(par(delayed(abs)(i) for i in [1, 2]))",
              "par(delayed(time.sleep)(s) for s in items)", ""),
    _slow_row("mpire", "WorkerPool(2).imap (its automatic chunk size)",
              "from mpire import WorkerPool\npool = WorkerPool(n_jobs=2, keep_alive=True)",
              "pool.map(abs, [1, 2])", "pool.imap(time.sleep, items)", "pool.terminate()"),
    _slow_row("pebble", "ProcessPool.map (chunksize 1)",
              "from pebble import ProcessPool\npool = ProcessPool(max_workers=2)",
              "list(pool.map(abs, [1, 2]).result())", "pool.map(time.sleep, items).result()",
              "pool.stop()\npool.join()"),
]

# Said in the output: what the rows pay for compiling, identical for stagepool and every peer.
BYTECODE = ("every row runs with bytecode writing on (PYTHONDONTWRITEBYTECODE unset) into one "
            "temporary cache, and once untimed before the timed rounds: every module, stdlib and "
            "stagepool alike, loads from a .pyc, as for a wheel that pip installed and compiled")

QUESTIONS = {
    "startup": (STARTUP_ROWS, [("first_s", "first result s", ".3f")], ("ppe-spawn", "first_s")),
    "respawn": (RESPAWN_ROWS, [("respawn_s", "deadline->next s", ".3f")],
                ("fork reference", "respawn_s")),
    "slow": (SLOW_ROWS, [("first_s", "first outcome s", ".2f"), ("first_items", "in items", ".2f"),
                         ("burst", "largest burst", ".0f"), ("total_s", "last s", ".2f")], None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(QUESTIONS))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    everything: dict[str, object] = {"bytecode": BYTECODE}
    print(f"bytecode: {BYTECODE}", flush=True)
    for question in args.only.split(","):
        rows, columns, base = QUESTIONS[question]
        print(f"running {question} ({len(rows)} rows x {args.repeat} + 1 untimed)...", flush=True)
        results = run_rows(rows, args.repeat, args.timeout)
        print(median_table(f"== {question} (median, min-max of {args.repeat})", rows, results,
                           columns, base), flush=True)
        everything[question] = {row.name: {"what": row.what, "runs": results[row.name]}
                                for row in rows}
        write_json(args.out, "startup.json", everything)


if __name__ == "__main__":
    main()
