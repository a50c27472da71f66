"""Tune a diffusion method's settings for one measurement setting on validation *tuning* slices.

Runs :func:`medrecon.tuning.tune` (successive halving of random configurations, objective
PSNR, the current defaults always a candidate) on the tuning rows of ``benchmarks/recon.py`` (CT
rows 7 and 24 of ``ct/val.npz``; the middle slices of the first two MRI subjects) — never the
slices recon.py reports.  The settings are those of recon.py (``--setting ct-23v``, ...,
including its CT noise).  Prints a table of the trials and one JSON line; ``--store`` writes the
winner to a model card as ``card["tuned"][operator_key][method]`` (when it beats the defaults, or
when the card holds no values measured on these weights: a prior with new weights gets its
settings re-measured, the old ones being a candidate), which ``run_diffusion`` then uses as
defaults.  Do not store into the shipped cards
in ``medrecon/priors/weights`` without the prior's owner.

    python benchmarks/tune.py --setting ct-23v --method ccdf --budget 12 --fixed '{"steps": 50}'
    python benchmarks/tune.py --setting ct-23v --prior ~/.cache/medrecon/export/ct-256.json --store ~/.cache/medrecon/export/ct-256.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recon  # noqa: E402  (the sibling benchmark script: data, settings and noise)

from medrecon.priors import ScorePrior  # noqa: E402
from medrecon.solvers.presets import tuned_entry  # noqa: E402
from medrecon.tuning import DEFAULT_SPACES, store_tuned_defaults, tune  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--setting", default="ct-23v", help=f"one of {', '.join(c.name for c in recon.CONFIGS)}"
    )
    p.add_argument("--method", default="ccdf")
    p.add_argument(
        "--prior", default=None, help="registry name or card path (default ct-256 / mri-256)"
    )
    p.add_argument(
        "--images", type=int, default=None, help="use the first N tuning rows (default all)"
    )
    p.add_argument("--budget", type=int, default=12, help="reconstructions to spend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1, help="posterior samples per reconstruction")
    p.add_argument(
        "--space",
        default=None,
        help="JSON search space (see _space; default DEFAULT_SPACES[method])",
    )
    p.add_argument("--fixed", default=None, help="JSON settings held fixed, e.g. '{\"steps\": 50}'")
    p.add_argument("--crop", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--store", default=None, help="model card to write the winner into")
    p.add_argument("--pool-noisy", action="store_true",
                   help="CT: tune on the noiseless and the noisy measurements of the tuning rows together "
                        "(one card entry per operator serves both)")
    return p.parse_args(argv)


def _space(text: str | None, method: str) -> dict[str, Any]:
    """JSON ``{"lam": [0.5, 1.0], "snr": [0.04, 0.4, "log"], "steps": {"choices": [50, 100]}}``: two
    floats = uniform range, a trailing "log" = log-uniform, ``{"choices": [...]}`` = choices."""
    if not text:
        return DEFAULT_SPACES[method]
    out: dict[str, Any] = {}
    for k, v in json.loads(text).items():
        if isinstance(v, dict):
            out[k] = list(v["choices"])
        elif isinstance(v, list) and (
            v[-1] == "log" or (len(v) == 2 and all(isinstance(a, float) for a in v))
        ):
            out[k] = tuple(v)
        else:
            out[k] = v
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Tune, print the table and the JSON line; return the JSON dict."""
    return recon.with_two_threads(_run, parse_args(argv))


def _run(args: argparse.Namespace) -> dict[str, Any]:
    by_name = {c.name: c for c in recon.CONFIGS}
    if args.setting not in by_name:
        raise SystemExit(f"--setting: unknown {args.setting!r}; known: {', '.join(by_name)}")
    cfg = by_name[args.setting]
    data = recon.load_data(recon.data_root(), True, args.crop)
    if cfg.modality not in data:
        raise SystemExit(f"no {cfg.modality} validation data under {recon.data_root()}")
    d = data[cfg.modality]
    rows = d["tune"][: args.images] if args.images else d["tune"]
    name = args.prior or ("ct-256" if cfg.modality == "ct" else "mri-256")
    prior = ScorePrior.load(name, device=args.device)
    A = cfg.build(d["size"])  # noqa: N806
    x = recon.ground_truth(d, rows)
    noisy = by_name.get(f"{cfg.name}-noisy") if args.pool_noisy and not cfg.noise else None
    if args.pool_noisy and noisy is None:
        raise SystemExit(f"--pool-noisy: {cfg.name} has no noisy twin setting")
    if noisy is not None:  # each row twice, noiseless then with the twin's noise (so every rung of
        x = x.repeat_interleave(2, dim=0)  # the successive halving sees both kinds)

    def noise(y: torch.Tensor, i: int) -> torch.Tensor:
        if noisy is not None:
            return recon.measure(noisy, A, x[i : i + 1], args.seed + i // 2) if i % 2 else y
        return recon.measure(cfg, A, x[i : i + 1], args.seed + i) if cfg.noise else y

    space = _space(args.space, args.method)
    fixed = json.loads(args.fixed) if args.fixed else None
    peak = recon.HU_WIDTH if cfg.modality == "ct" else 1.0
    t0 = time.perf_counter()
    res = tune(
        prior,
        lambda i: A,
        x.to(args.device),
        space,
        args.budget,
        args.seed,
        method=args.method,
        data_range=peak,
        noise=noise,
        n_samples=args.samples,
        fixed=fixed,
        log=lambda m: print(f"# {m}", flush=True),
    )
    wall = time.perf_counter() - t0
    keys = sorted({k for t in res["trials"] for k in t["settings"]})
    head = (
        " ".join(f"{k:>8s}" for k in keys)
        + f" {'PSNR dB':>8s} {'images':>6s} {'s/run':>7s} {'NFE':>5s}"
    )
    print(
        f"tuning {args.method} on {cfg.name} ({res['operator_key']}), rows {rows}, fixed {fixed or {}}"
    )
    print(head)
    print("-" * len(head))
    for t in res["trials"]:
        mark = (
            " <- best"
            if t["settings"] == res["best"]
            else (" (defaults)" if t["settings"] == res["defaults"] else "")
        )
        vals = " ".join(f"{t['settings'].get(k, ''):>8}" for k in keys)
        print(f"{vals} {t['psnr']:8.2f} {t['n_images']:6d} {t['seconds']:7.1f} {t['nfe']:5d}{mark}")
    gain = res["best_psnr"] - res["defaults_psnr"]
    print(
        f"best {res['best']} {res['best_psnr']:.2f} dB vs defaults {res['defaults']} {res['defaults_psnr']:.2f} dB "
        f"(+{gain:.2f} dB), {res['runs']} runs, {wall:.0f} s"
    )
    stored = None
    card_entry, stale = tuned_entry(prior.card, A, args.method)
    # store a gain, or the best measured on these weights where the card holds none for them
    if args.store and (gain > 0 or not card_entry or stale):
        store_tuned_defaults(
            args.store, res["operator_key"], {args.method: {**(fixed or {}), **res["best"]}}
        )
        stored = str(args.store)
        print(f"stored in {stored} under tuned/{res['operator_key']}/{args.method}")
    out = {
        "bench": "tune",
        "device": args.device if args.device != "cpu" else f"cpu ({platform.machine()})",
        "threads": torch.get_num_threads(),
        "setting": cfg.name,
        "rows": rows,
        "pooled_noisy": noisy is not None,
        "prior": name,
        "stored": stored,
        "wall_s": round(wall, 1),
        "results": res["trials"],
        **{k: v for k, v in res.items() if k != "trials"},
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
