"""Does the uncertainty say what it is?  Coverage on limited-angle CT, and hallucination measures.

Two questions of issue 31 (item 3), on the *report* rows of ``benchmarks/recon.py`` (CT rows 2, 13,
27 of ``ct/val.npz``; MRI the middle slices of three later subjects), never on the tuning rows:

1. **Coverage off the tuned keys.**  Limited-angle parallel-beam CT (``--arcs``, default 90° and
   120° of the half circle, ``--views`` 60 equally spaced views over the arc, noiseless): DDS with
   ``--samples`` posterior samples at whatever the prior's card holds for the operator key
   (``parallel-60-la90``: nothing tuned or calibrated, so the preset and the raw spread) against
   TV with its weight swept on the tuning rows (rows 7 and 24) with that operator.  Printed: PSNR
   of both; the factor the API applied to the std and why; coverage (share of pixels with
   ``|error| ≤ 2·std``, std as returned); median std and median ``|error|`` over all pixels (HU);
   and, as a diagnostic only (fitted on these rows, never stored), the factor ``c95`` that would
   have given 95 % coverage.
2. **A hallucination measure.**  Per pixel, candidates that might flag invented structure better
   than the posterior std, each compared with ``|error|`` by the Spearman rank correlation over
   all pixels of a slice, averaged over slices (as recon.py does for the std):

   * ``std``: the posterior std (the reference);
   * ``|dds−tv|``: ``|x_DDS − x_TV|``, the disagreement with the classical estimate (TV at the
     swept weight, the baseline of the table);
   * ``|dds−start|``: the same against TV at the API's default weight (λ 1e-4, 100 iterations),
     the estimate DDS starts from, which a reconstruction has at no extra cost;
   * ``|dds−tv|*g2``: the same smoothed by a Gaussian of ``--smooth-px`` (2) pixels;
   * ``null std``: the per-pixel std over samples of ``P_null(x_i − mean)``, the spread of the
     samples in the operator's null space, ``P_null v = v − A⁺A v`` with ``A⁺A v`` from
     ``--cg-iters`` (10) CG steps on ``AᴴA z = AᴴA v``;
   * ``|null(dds−tv)|``: ``|P_null(x_DDS − x_TV)|``, the part of the disagreement with TV that
     the scanner cannot see.

   Rule fixed before the run (the issue's): a candidate is kept if its Spearman (the mean over a
   setting's report slices) beats the std's on every decision setting (``--decide``: CT 10, 23, 60
   views, and the MRI settings run).  The table is printed either way.

The settings are recon.py's (``--configs``: its names, e.g. ``ct-10v,ct-23v,ct-60v,mri-8x-equispaced``)
plus ``ct-la<arc>`` for the limited-angle ones; TV weights of recon.py's settings come from its
sweep (``recon_sweep.json`` cache), those of the limited-angle settings from a sweep of the same
kind on the tuning rows with that operator (or ``--lam-tv``).  Prints a table of coverage, a
table of Spearman correlations, the decision, then one JSON line; ``--combine LOG...`` reports
the JSON lines of separate runs (say, one setting per process) as one.

    python benchmarks/uncertainty.py --threads 1
    python benchmarks/uncertainty.py --configs ct-la90 --slices 1 --samples 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recon  # noqa: E402  (the sibling benchmark: data, settings, noise, TV sweep)

from medrecon import reconstruct  # noqa: E402
from medrecon.api import METHODS, problem_scale  # noqa: E402
from medrecon.linalg import conjugate_gradient  # noqa: E402
from medrecon.solvers.cards import operator_key  # noqa: E402

DEFAULT_CONFIGS = "ct-la90,ct-la120,ct-10v,ct-23v,ct-60v"
DECIDE = "ct-10v,ct-23v,ct-60v,mri"
CANDIDATES = ("std", "|dds−tv|", "|dds−start|", "|dds−tv|*g2", "null std", "|null(dds−tv)|")


def limited_angle_config(arc_deg: float, n_views: int) -> recon.Config:
    """``ct-la<arc>`` with the TV and DDS rows this benchmark runs (:func:`recon.limited_angle_config`)."""
    return dataclasses.replace(recon.limited_angle_config(arc_deg, n_views), methods=("tv", "dds"))


# ------------------------------------------------------------------------------- the measures
def null_space_part(A: Any, v: torch.Tensor, iters: int) -> torch.Tensor:  # noqa: N803
    """``v − A⁺A v``: the part of ``v`` (B, C, H, W) that ``A`` does not see, ``A⁺A v`` from ``iters``
    CG steps on ``AᴴA z = AᴴA v`` (started at zero)."""
    rhs = A.normal(v)
    return v - conjugate_gradient(A.normal, rhs, iters=iters, tol=1e-6)


def candidate_maps(
    A: Any, samples: torch.Tensor, tv: torch.Tensor, start: torch.Tensor, std: torch.Tensor,  # noqa: N803
    iters: int, smooth_px: float,
) -> dict[str, np.ndarray]:
    """Per-pixel maps (B, H, W) of every candidate; ``samples`` (n, B, C, H, W), ``tv`` and ``start``
    (B, C, H, W)."""
    from scipy.ndimage import gaussian_filter

    mean = samples.mean(0)
    n = samples.shape[0]
    dev = torch.stack([null_space_part(A, samples[i] - mean, iters) for i in range(n)])
    null_std = (dev.abs() ** 2).sum(0).div(max(n - 1, 1)).sqrt()
    diff = mean - tv
    null_diff = null_space_part(A, diff, iters).abs()

    def plane(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().abs()[:, 0].numpy().astype(np.float64)

    d = plane(diff)
    return {
        "std": plane(std),
        "|dds−tv|": d,
        "|dds−start|": plane(mean - start),
        "|dds−tv|*g2": np.stack([gaussian_filter(p, smooth_px) for p in d]),
        "null std": plane(null_std),
        "|null(dds−tv)|": plane(null_diff),
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Rank correlation over all pixels, None where either map is constant."""
    from scipy.stats import spearmanr

    a, b = a.ravel(), b.ravel()
    if a.std() == 0 or b.std() == 0:
        return None
    return float(spearmanr(a, b).statistic)


# -------------------------------------------------------------------------------- one setting
def _run(cfg: recon.Config, A: Any, y: torch.Tensor, method: str, prior: Any, n_samples: int,  # noqa: N803
         seed: int, settings: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict]:
    """(mean, std, samples, info) in caller units; MRI items scaled to their own normaliser first."""
    scale = torch.ones(y.shape[0])
    if cfg.modality == "mri":
        scale = torch.tensor([problem_scale(y[i : i + 1], A)[1] for i in range(y.shape[0])])
    s4 = scale.reshape(-1, 1, 1, 1)
    kw = dict(settings)
    if method == "dds":
        kw.update(prior=prior, n_samples=n_samples, seed=seed)
    rec = reconstruct(y / s4.to(y.real.dtype), A, method, **kw)
    std = None if rec.std is None else rec.std * s4
    samples = None if rec.samples is None else rec.samples * s4
    return rec.mean * s4, std, samples, rec.info


def tv_weight(cfg: recon.Config, data: dict[str, Any], seed: int, iters: dict[str, Any], use_cache: bool,
              log: Any, fixed: dict[str, float]) -> float:
    """recon.py's swept TV weight (:func:`recon.tuned_weights`: a limited-angle setting is swept on its
    own tuning rows), or the weight ``fixed`` gives a limited-angle setting."""
    if cfg.family not in recon.SWEEP_CONFIG and cfg.name in fixed:
        return fixed[cfg.name]
    return recon.tuned_weights([cfg], data, ["tv"], seed, use_cache, log, iters)[cfg.family]["tv"]["lam"]


def evaluate(cfg: recon.Config, data: dict[str, Any], rows: list[int], prior: Any, args: argparse.Namespace,
             lam: float) -> dict[str, Any]:
    """TV and DDS on the rows; coverage, medians and each candidate's Spearman with |error|."""
    d = data[cfg.modality]
    A = cfg.build(d["size"])  # noqa: N806
    x = recon.ground_truth(d, rows)
    y = recon.measure(cfg, A, x, args.seed)
    iters = {"iters": args.iters} if args.iters else {}
    tv, _, _, _ = _run(cfg, A, y, "tv", None, 1, args.seed, {"lam": lam, **iters})
    if lam == METHODS["tv"]["lam"] and not iters:
        start = tv
    else:  # the API's defaults: DDS's start
        start, _, _, _ = _run(cfg, A, y, "tv", None, 1, args.seed, iters)
    t0 = time.perf_counter()
    mean, std, samples, info = _run(cfg, A, y, "dds", prior, args.samples, args.seed,
                                    {} if args.steps is None else {"steps": args.steps})
    seconds = time.perf_counter() - t0
    psnr_tv = recon.slice_metrics(cfg, tv, None, x)["psnr"]
    psnr_dds = recon.slice_metrics(cfg, mean, None, x)["psnr"]
    ref = x.to(mean.dtype) if mean.is_complex() else x
    err = (mean.abs() - ref.abs() if mean.is_complex() else mean - ref).abs()[:, 0].numpy().astype(np.float64)
    maps = candidate_maps(A, samples, tv, start, std, args.cg_iters, args.smooth_px)
    s = maps["std"]
    scale = float(info.get("std_scale") or 1.0)
    ratio = err / np.maximum(2 * s / scale, 1e-30)  # |error| / (2 · raw std)
    row: dict[str, Any] = {
        "config": cfg.name, "key": operator_key(A), "rows": rows, "n_views": int(np.asarray(A.view_mask).sum())
        if hasattr(A, "view_mask") else None,
        "psnr_tv": round(float(np.mean(psnr_tv)), 3), "psnr_dds": round(float(np.mean(psnr_dds)), 3),
        "lam_tv": lam, "std_scale": scale, "std_calibration": info.get("std_calibration"),
        "settings": {k: v for k, v in info.get("settings", {}).items() if isinstance(v, int | float | str | bool)},
        "tuned": info.get("tuned"), "nfe": int(info.get("nfe", 0)), "seconds": round(seconds, 1),
        "coverage_2sigma": round(float(np.mean(err <= 2 * s)), 4),
        "median_std": round(float(np.median(s)), 3), "median_abs_error": round(float(np.median(err)), 3),
        "c95": round(float(np.quantile(ratio, 0.95)), 3),
        "units": "HU" if cfg.modality == "ct" else "magnitude",
        "spearman": {},
    }
    for name, m in maps.items():
        per = [spearman(m[i], err[i]) for i in range(len(rows))]
        vals = [v for v in per if v is not None]
        row["spearman"][name] = {"mean": round(float(np.mean(vals)), 4) if vals else None,
                                 "per_slice": [None if v is None else round(v, 4) for v in per]}
    return row


def decide(results: list[dict[str, Any]], spec: str) -> dict[str, Any]:
    """Each candidate against the std on the decision settings: kept if its Spearman is higher on
    every row (per setting, the mean over its slices)."""
    wanted = [w for w in spec.split(",") if w]
    rows = [r for r in results if any(r["config"] == w or r["config"].startswith(w) for w in wanted)]
    out: dict[str, Any] = {"settings": [r["config"] for r in rows], "candidates": {}}
    for name in CANDIDATES[1:]:
        wins = [r["spearman"][name]["mean"] is not None and r["spearman"]["std"]["mean"] is not None
                and r["spearman"][name]["mean"] > r["spearman"]["std"]["mean"] for r in rows]
        out["candidates"][name] = {"wins": sum(wins), "of": len(rows), "kept": bool(rows) and all(wins)}
    return out


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="recon.py setting names or prefixes, and ct-la<arc> for the limited-angle ones")
    p.add_argument("--arcs", default="90,120", help="degrees of the limited-angle settings ct-la<arc>")
    p.add_argument("--views", type=int, default=60, help="views over each limited arc")
    p.add_argument("--slices", default=None, help="N: the first N report rows (default recon.py's quick rows)")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="diffusion steps (default: card or preset)")
    p.add_argument("--prior-ct", default="ct-256")
    p.add_argument("--prior-mri", default="mri-256")
    p.add_argument("--cg-iters", type=int, default=10, help="CG steps of A⁺A in the null-space projection")
    p.add_argument("--smooth-px", type=float, default=2.0, help="Gaussian σ (pixels) of the smoothed |dds−tv|")
    p.add_argument("--decide", default=DECIDE, help="settings (names or prefixes) the keep rule is judged on")
    p.add_argument("--lam-tv", default=None,
                   help="TV weights of limited-angle settings instead of their sweep, e.g. ct-la120=1e-4")
    p.add_argument("--crop", type=int, default=None, help="centre crop (smoke tests)")
    p.add_argument("--iters", type=int, default=None, help="TV iterations (default the API's 100; smoke tests)")
    p.add_argument("--no-cache", action="store_true", help="re-run the TV sweeps and write no cache")
    p.add_argument("--combine", nargs="+", default=None, metavar="LOG",
                   help="run nothing: print the tables and the decision of earlier runs' JSON lines (their logs), together")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the tables and the JSON line; return the JSON dict."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        torch.manual_seed(args.seed)
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _configs(args: argparse.Namespace) -> list[recon.Config]:
    limited = {c.name: c for c in (limited_angle_config(float(a), args.views) for a in args.arcs.split(",") if a)}
    out: list[recon.Config] = []
    for w in (w.strip() for w in args.configs.split(",") if w.strip()):
        if w in limited:
            out.append(limited[w])
        elif w == "ct-la":
            out += list(limited.values())
        else:
            found = recon.select_configs(w)
            if not found:
                known = ", ".join([*limited, *(c.name for c in recon.CONFIGS)])
                raise SystemExit(f"--configs: unknown setting {w!r}; known: {known}")
            out += [c for c in found if c not in out]
    return out


def _main(args: argparse.Namespace) -> dict[str, Any]:
    from medrecon.training.runtime import cpu_model

    t_start = time.perf_counter()
    if args.combine:
        return _combine(args)
    configs = _configs(args)
    data = recon.load_data(recon.data_root(), True, args.crop)
    if not data:
        raise SystemExit(f"no validation data under {recon.data_root()} (set MEDRECON_DATA)")
    configs = [c for c in configs if c.modality in data]
    rows_used = {m: (d["report"][: int(args.slices)] if args.slices else d["report"]) for m, d in data.items()}

    def log(msg: str) -> None:
        print(msg, flush=True)

    cpu = cpu_model()
    log(f"# uncertainty benchmark: rows {rows_used} (tuning rows ct={data.get('ct', {}).get('tune')} "
        f"mri={data.get('mri', {}).get('tune')}), {args.samples} samples, {cpu}, {args.threads} thread(s)")
    priors = {m: recon.load_prior(getattr(args, f"prior_{m}"), "cpu") for m in {c.modality for c in configs}}
    iters = {"iters": args.iters} if args.iters else {}
    fixed = {k: float(v) for k, v in (s.split("=") for s in args.lam_tv.split(",") if s)} if args.lam_tv else {}
    results: list[dict[str, Any]] = []
    for cfg in configs:
        prior, why = priors[cfg.modality]
        if prior is None:
            log(f"# {cfg.name}: skipped ({why})")
            results.append({"config": cfg.name, "skipped": why})
            continue
        lam = tv_weight(cfg, data, args.seed, iters, not args.no_cache, log, fixed)
        r = evaluate(cfg, data, rows_used[cfg.modality], prior, args, lam)
        results.append(r)
        log(f"# {cfg.name} ({r['key']}): TV {r['psnr_tv']:.2f} dB, DDS {r['psnr_dds']:.2f} dB, "
            f"coverage {r['coverage_2sigma']:.3f}, {r['seconds']:.0f} s")
    out = {
        "bench": "uncertainty", "device": "cpu", "cpu": cpu, "threads": args.threads, "samples": args.samples,
        "rows": rows_used, "tuning_rows": {m: d["tune"] for m, d in data.items()},
        "size": {m: d["size"] for m, d in data.items()}, "views_limited": args.views,
        "cg_iters": args.cg_iters, "smooth_px": args.smooth_px,
        "priors": {m: (r or "loaded") for m, (_, r) in priors.items()},
        "results": results,
    }
    return _report(out, args, t_start)


def _combine(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON lines of earlier runs (the last line of each log), reported as one run."""
    runs = [json.loads(Path(p).read_text().strip().splitlines()[-1]) for p in args.combine]
    out = {k: v for k, v in runs[0].items() if k not in ("results", "decision", "wall_s")}
    out.update(combined=list(args.combine), results=[r for run in runs for r in run["results"]],
               rows={m: sorted({i for run in runs for i in run["rows"].get(m, [])}) for m in runs[0]["rows"]})
    return _report(out, args, time.perf_counter())


def _report(out: dict[str, Any], args: argparse.Namespace, t_start: float) -> dict[str, Any]:
    """Print the tables, the decision and the JSON line of ``out`` (its ``results``)."""
    results = out["results"]
    done = [r for r in results if "skipped" not in r]

    head = (f"{'setting':20s} {'key':18s} {'TV dB':>6s} {'DDS dB':>6s} {'std ×':>6s} {'cov±2σ':>6s} "
            f"{'med std':>8s} {'med|err|':>8s} {'c95':>6s} {'NFE':>4s}  std calibration")
    print(head)
    print("-" * len(head))
    for r in done:
        print(f"{r['config']:20s} {r['key']:18s} {r['psnr_tv']:6.2f} {r['psnr_dds']:6.2f} {r['std_scale']:6.3f} "
              f"{r['coverage_2sigma']:6.3f} {r['median_std']:8.2f} {r['median_abs_error']:8.2f} {r['c95']:6.3f} "
              f"{r['nfe']:4d}  {r['std_calibration']}")
    print(f"(medians over all pixels, in {', '.join(sorted({r['units'] for r in done}))}; c95 = the factor on the "
          "raw std that would give 95 % coverage on these rows, a diagnostic, not stored)")
    head = f"{'Spearman with |error|':20s} " + " ".join(f"{c:>14s}" for c in CANDIDATES)
    print(head)
    print("-" * len(head))
    for r in done:
        print(f"{r['config']:20s} " + " ".join(
            f"{r['spearman'][c]['mean']:14.3f}" if r["spearman"][c]["mean"] is not None else f"{'–':>14s}"
            for c in CANDIDATES))
    verdict = decide(done, args.decide)
    print(f"keep rule: Spearman above the std's on every decision setting ({', '.join(verdict['settings']) or 'none run'})")
    for name, v in verdict["candidates"].items():
        print(f"  {name:16s} beats the std on {v['wins']} of {v['of']}: {'KEEP' if v['kept'] else 'not kept'}")
    wall = time.perf_counter() - t_start
    print(f"# wall time {wall:.0f} s")
    out.update(decision=verdict, wall_s=round(wall, 1))
    print(json.dumps(out, default=str), flush=True)
    return out


if __name__ == "__main__":
    main()
