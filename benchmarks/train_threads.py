"""How to use the cores for prior training: one run at T threads against T runs at one thread.

Runs the trainer (``medrecon train``) for ``--seconds`` in each layout, with and without
tcmalloc (when the library is found), and reads the steps off each run's own ``loss.csv``:

* ``1×T``: one run at ``--threads`` T intra-op threads on all the cores;
* ``T×1``: T runs side by side, one thread each, each pinned to its own core.

The table gives steps per second per run and in total.  Per prior, the faster layout is the one
with the higher per-run rate when a single prior trains; for several priors (or a design
comparison) the total rate counts.  Run it on an idle machine.  Last line: JSON.

    python benchmarks/train_threads.py --preset ct-256-grown --seconds 100
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
            "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")


def find_tcmalloc() -> str | None:
    """The first tcmalloc shared library found, or None."""
    return next((p for p in TCMALLOC if Path(p).is_file()), None)


def steps_per_s(loss_csv: Path, skip: int = 10) -> tuple[int, float]:
    """(steps, steps/s) from a run's ``loss.csv``, leaving out the first ``skip`` steps (warm-up)."""
    with open(loss_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) <= skip + 1:
        raise SystemExit(f"{loss_csv}: only {len(rows)} steps logged; give more --seconds")
    step = np.array([int(r["step"]) for r in rows])
    wall = np.array([float(r["wall_s"]) for r in rows])
    return int(step[-1]), float((step[-1] - step[skip]) / max(wall[-1] - wall[skip], 1e-9))


def launch(args: argparse.Namespace, name: str, threads: int, cpus: list[int], preload: str | None,
           out: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = preload
    cmd = [sys.executable, "-m", "medrecon.training", "--run", f"threads-{name}", "--out-dir", str(out / name),
           "--threads", str(threads), "--max-time-s", str(args.seconds), "--validate-every-s", "0",
           "--sample-every-s", "0", "--checkpoint-every-s", "1e9", "--progress", "false", "--log-every", "1",
           "--resume", "false", *args.train_args]
    if args.preset:
        cmd += ["--preset", args.preset]
    if hasattr(os, "sched_setaffinity"):
        def pin() -> None:
            os.sched_setaffinity(0, cpus)
    else:  # pragma: no cover - platforms without affinity
        pin = None
    log = open(out / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ct-256-grown", help="training preset (empty: only --train-args)")
    p.add_argument("--seconds", type=float, default=100.0, help="wall time of each run")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="T")
    p.add_argument("--no-tcmalloc", action="store_true", help="measure the default allocator only")
    p.add_argument("--out", default=None, help="run folders (default: a temporary folder)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: more trainer arguments")
    a = p.parse_args(argv)
    a.train_args = [x for x in a.train_args if x != "--"]
    t = a.threads
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if t < 1 or t > len(cores):
        raise SystemExit(f"--threads: {t} is not between 1 and the {len(cores)} cores this process may use")
    tc = None if a.no_tcmalloc else find_tcmalloc()
    allocators = [("glibc", None)] + ([("tcmalloc", tc)] if tc else [])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for alloc, lib in allocators:
            for layout in (f"1x{t}", f"{t}x1"):
                if layout == f"1x{t}":
                    procs = [launch(a, f"{alloc}-{layout}", t, cores[:t], lib, out)]
                else:
                    procs = [launch(a, f"{alloc}-{layout}-{k}", 1, [cores[k]], lib, out) for k in range(t)]
                codes = [pr.wait() for pr in procs]
                names = [Path(pr.args[pr.args.index("--out-dir") + 1]).name for pr in procs]
                if any(codes):
                    bad = [n for n, c in zip(names, codes, strict=True) if c]
                    raise SystemExit(f"train_threads: run(s) {bad} failed; see {out}/<name>.log")
                rates = [steps_per_s(out / n / "loss.csv")[1] for n in names]
                rows.append({"allocator": alloc, "layout": layout, "runs": len(procs),
                             "threads_per_run": t if len(procs) == 1 else 1,
                             "steps_per_s_per_run": round(float(np.mean(rates)), 3),
                             "steps_per_s_total": round(float(np.sum(rates)), 3)})
    print(f"prior training, {a.preset or 'custom'}, {a.seconds:g} s per layout, {len(cores)} cores")
    print(f"{'allocator':<10} {'layout':<8} {'steps/s per run':>16} {'steps/s total':>14}")
    for r in rows:
        print(f"{r['allocator']:<10} {r['layout']:<8} {r['steps_per_s_per_run']:16.3f} {r['steps_per_s_total']:14.3f}")
    best_one = max(rows, key=lambda r: r["steps_per_s_per_run"])
    best_all = max(rows, key=lambda r: r["steps_per_s_total"])
    print(f"one prior: {best_one['allocator']} {best_one['layout']}; several: {best_all['allocator']} {best_all['layout']}")
    res = {"bench": "train_threads", "preset": a.preset, "seconds": a.seconds, "cores": len(cores),
           "tcmalloc": tc, "results": rows,
           "fastest_per_prior": f"{best_one['allocator']} {best_one['layout']}",
           "fastest_in_total": f"{best_all['allocator']} {best_all['layout']}"}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
