"""Training recipes at equal wall time (issue 32): which one makes each CPU-hour count.

Two measurements, each on the CPU it runs on (recorded in the output):

* **Step time** (``--micro``): one training step of the preset's network on synthetic batches of
  each patch size of the preset (64² × 16, 128² × 4, 256² × 1 for the position-aware design),
  per arithmetic (float32, bfloat16 autocast), ``torch.compile`` or not, and threads; the median
  of the last steps, and the patch-mix average the trainer pays per step.  Two one-thread
  processes side by side (``2×1``) are timed together, as the campaign runs the CT and MRI priors.
* **Equal wall time**: each candidate recipe continues the preset's starting weights
  (``init_from``) for ``--seconds`` with one thread, two candidates at a time side by side,
  each pinned to its own core (as the campaign trains); then every run's EMA weights and the
  starting prior denoise the validation slices by Tweedie's formula at ``--sigmas`` (the same
  noise draws for every run).  ``--runs DIR ...`` judges run folders trained before (by this
  script or by ``medrecon train`` with the same flags) instead of training.

Candidates (``--candidates``, comma-separated names):

* ``fp32-uniform``: the v2 recipe, float32, noise levels uniform in t;
* ``bf16-uniform``: bfloat16 autocast for the forward and backward pass (float32 master weights,
  optimiser and EMA);
* ``bf16-focused``: bfloat16 and ``t_dist="focused"`` (a quarter of the draws uniform, the rest
  log-uniform in σ ∈ [σ_min, 0.5], where DDS and CCDF query the prior from a classical start);
* ``bf16-compile``: bfloat16 and ``torch.compile``.

Pause other work while it runs: a loaded host makes the seconds meaningless.  Last line: JSON.

    python benchmarks/train_recipe.py --micro
    python benchmarks/train_recipe.py --preset ct-256 --seconds 1200 --candidates fp32-uniform,bf16-uniform,bf16-focused
    python benchmarks/train_recipe.py --preset ct-256 --runs ~/.cache/medrecon/train/cmp-A ~/.cache/medrecon/train/cmp-B
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_threads  # noqa: E402  (the sibling benchmark: launching pinned runs, reading loss.csv)

CANDIDATES: dict[str, list[str]] = {
    "fp32-uniform": ["--precision", "float32", "--t-dist", "uniform"],
    "bf16-uniform": ["--precision", "bfloat16", "--t-dist", "uniform"],
    "bf16-focused": ["--precision", "bfloat16", "--t-dist", "focused"],
    "bf16-compile": ["--precision", "bfloat16", "--t-dist", "uniform", "--compile", "true"],
}


def micro_step_times(preset: str, precision: str, compile_: bool, threads: int, steps: int = 8) -> dict[str, float]:
    """Median seconds per training step (forward, backward, AdamW) per patch size of ``preset``,
    and ``"mix"``: the average over the preset's patch-size probabilities."""
    from medrecon.priors.networks import ScoreNet
    from medrecon.training import PRESETS, TrainConfig, dsm_loss, sample_t, train_autocast

    torch.set_num_threads(threads)
    cfg = TrainConfig(**PRESETS[preset])
    sde = cfg.build_sde()
    net = ScoreNet(cfg.network_spec(), sde, cfg.sigma_data)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    model = torch.compile(net) if compile_ else net
    cast = train_autocast(precision, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    sizes = cfg.patch_sizes or (cfg.patch_size or 256,)
    batches = cfg.patch_batch or (cfg.batch_size,) * len(sizes)
    probs = cfg.patch_probs or (1.0,) * len(sizes)
    out: dict[str, float] = {}
    for p, b in zip(sizes, batches, strict=True):
        x0 = torch.rand(b, 1, p, p)
        c0 = torch.rand(b, 2, p, p) if cfg.coords else None
        times = []
        for _ in range(steps + (6 if compile_ else 2)):
            t0 = time.perf_counter()
            loss = dsm_loss(model, sde, x0, gen, coords=c0, t=sample_t(sde, b, gen), cast=cast)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        out[str(p)] = statistics.median(times[-steps:])
    out["mix"] = sum(w * out[str(p)] for w, p in zip(probs, sizes, strict=True)) / sum(probs)
    return out


def run_micro(a: argparse.Namespace) -> list[dict[str, Any]]:
    """Each (precision, compile, threads) layout in a fresh process; ``2×1``: two one-thread
    processes at once, each pinned to a core."""
    layouts = [("float32", False, 1, 1), ("bfloat16", False, 1, 1), ("bfloat16", True, 1, 1),
               ("float32", False, 2, 1), ("bfloat16", False, 2, 1), ("bfloat16", False, 1, 2)]
    rows = []
    for precision, comp, threads, procs in layouts:
        code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import train_recipe; "
                f"print(json.dumps(train_recipe.micro_step_times({a.preset!r}, {precision!r}, {comp}, {threads})))")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
        if train_threads.find_tcmalloc():
            env["LD_PRELOAD"] = train_threads.find_tcmalloc()
        ps = []
        for i in range(procs):
            pin = (lambda i=i: os.sched_setaffinity(0, [i])) if procs > 1 else None
            ps.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True,
                                       preexec_fn=pin))
        res = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in ps]
        mix = statistics.mean(r["mix"] for r in res)
        rows.append({"precision": precision, "compile": comp, "threads": threads, "processes": procs,
                     "s_per_step": {k: round(statistics.mean(r[k] for r in res), 3) for k in res[0]},
                     "steps_per_s_total": round(procs / mix, 3)})
        print(f"{precision:<9} {'compile' if comp else 'eager':<8} {procs}×{threads} "
              + " ".join(f"{k:>4}: {v:.3f} s" for k, v in rows[-1]["s_per_step"].items())
              + f"   total {rows[-1]['steps_per_s_total']:.2f} steps/s", flush=True)
    return rows


def train_candidates(a: argparse.Namespace, out: Path) -> list[Path]:
    """Each candidate continues the preset's start for ``--seconds``, two at a time, pinned."""
    names = [n.strip() for n in a.candidates.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise SystemExit(f"--candidates: unknown {unknown}; known: {', '.join(CANDIDATES)}")
    preload = train_threads.find_tcmalloc()
    runs = []
    for i in range(0, len(names), 2):
        procs = []
        for core, name in enumerate(names[i : i + 2]):
            ns = argparse.Namespace(seconds=a.seconds, preset=a.preset,
                                    train_args=["--patience", "0", *CANDIDATES[name]])
            procs.append(train_threads.launch(ns, name, 1, [core], preload, out))
            runs.append(out / name)
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"a candidate run failed: see the logs in {out}")
    return runs


def judge(a: argparse.Namespace, runs: list[Path]) -> list[dict[str, Any]]:
    """Tweedie denoising of the validation slices by the starting prior and each run's EMA."""
    from medrecon.priors import ScorePrior
    from medrecon.training import PRESETS, TrainConfig, load_ema_net, load_slices, validate

    torch.set_num_threads(a.threads)
    preset = TrainConfig(**PRESETS[a.preset])
    images = load_slices([preset.val_data], preset.modality)[:: a.every]
    sigmas = tuple(float(s) for s in a.sigmas.split(","))
    nets: list[tuple[str, Any, dict[str, Any]]] = []
    if preset.init_from:
        start = ScorePrior.load(preset.init_from)
        nets.append((f"start ({preset.init_from})", start.net, {"steps": 0, "wall_s": 0.0}))
    for run in runs:
        net, cfg, ck = load_ema_net(run / "last.pt")
        steps, rate = train_threads.steps_per_s(run / "loss.csv")
        nets.append((run.name, net, {"steps": steps, "wall_s": round(float(ck["wall_s"]), 1),
                                     "steps_per_s": round(rate, 3), "precision": cfg.precision,
                                     "t_dist": cfg.t_dist, "compile": cfg.compile,
                                     "runtime": ck.get("runtime", {})}))
    rows = []
    for name, net, info in nets:
        with torch.no_grad():
            res = validate(net, images, sigmas)
        rows.append({"run": name, **info, **{k: round(v, 3) for k, v in res.items()}})
    keys = [f"psnr_sigma{s}" for s in sigmas]
    print(f"\nequal wall time on {preset.val_data} ({len(images)} slices): Tweedie PSNR dB (peak 1, normalised)")
    print(f"{'run':<24} {'steps':>6} {'steps/s':>8} " + " ".join(f"{'σ=' + k[10:]:>8}" for k in keys))
    for r in rows:
        print(f"{r['run']:<24} {r['steps']:>6} {r.get('steps_per_s', 0):8.3f} " + " ".join(f"{r[k]:8.2f}" for k in keys))
    return rows


def main(argv: list[str] | None = None) -> dict:
    from medrecon.training.runtime import cpu_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ct-256", help="training preset (its init_from is the start)")
    p.add_argument("--micro", action="store_true", help="step times only (synthetic batches)")
    p.add_argument("--seconds", type=float, default=1200.0, help="wall time of each candidate run")
    p.add_argument("--candidates", default="fp32-uniform,bf16-uniform,bf16-focused")
    p.add_argument("--runs", nargs="*", default=None, help="judge these run folders instead of training")
    p.add_argument("--out", default=None, help="run folders (default: a temporary folder)")
    p.add_argument("--sigmas", default="0.02,0.05,0.1,0.2,0.5,1,2")
    p.add_argument("--every", type=int, default=1, help="use every k-th validation slice")
    p.add_argument("--threads", type=int, default=1, help="threads of the validation")
    a = p.parse_args(argv)
    result: dict[str, Any] = {"bench": "train_recipe", "preset": a.preset, "cpu": cpu_model(),
                              "torch": str(torch.__version__)}
    print(f"training recipes, preset {a.preset}, {result['cpu']}, torch {torch.__version__}")
    if a.micro:
        result["micro"] = run_micro(a)
    else:
        if a.runs is not None:
            runs = [Path(r).expanduser() for r in a.runs]
        else:
            out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="train-recipe-"))
            out.mkdir(parents=True, exist_ok=True)
            runs = train_candidates(a, out)
        result["seconds"] = a.seconds
        result["equal_time"] = judge(a, runs)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
