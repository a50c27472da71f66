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

The volume methods (``--method dds3d`` or ``mbir3d``) are tuned on volumes instead: ``--blocks``
disjoint blocks of ``--slices`` contiguous slices of the tuning volume (``--volume``, default
``benchmarks/mbir3d.TUNING_VOLUME``; never the report volume), noiseless parallel-beam CT with
``--views`` views (operator key ``parallel-<views>``, the one the volume methods are stored
under: a 2-D method of the same operator has its own entry beside it).  ``--max-nfe`` keeps
the search to configurations of at most that many network evaluations per slice and sample.

    python benchmarks/tune.py --setting ct-23v --method ccdf --budget 12 --fixed '{"steps": 50}'
    python benchmarks/tune.py --setting ct-23v --prior ~/.cache/medrecon/export/ct-256.json --store ~/.cache/medrecon/export/ct-256.json
    python benchmarks/tune.py --method dds3d --views 23 --slices 16 --blocks 3 --budget 24 --max-nfe 12 --store CARD
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
import mbir3d  # noqa: E402  (the sibling 3-D benchmark: the tuning volume)
import recon  # noqa: E402  (the sibling benchmark script: data, settings and noise)

from medrecon.priors import ScorePrior  # noqa: E402
from medrecon.solvers.presets import tuned_entry  # noqa: E402
from medrecon import reconstruct  # noqa: E402
from medrecon.tuning import DEFAULT_SPACES, store_tuned_defaults, tune, z_error  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--setting", default="ct-23v", help=f"one of {', '.join(c.name for c in recon.CONFIGS)}, or ct-la<arc> (limited angle)"
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
    g = p.add_argument_group("volume methods (dds3d, mbir3d)")
    g.add_argument("--volume", default=mbir3d.TUNING_VOLUME, help="tuning volume (default %(default)s)")
    g.add_argument("--views", type=int, default=23, help="parallel-beam views (default %(default)s)")
    g.add_argument("--slices", type=int, default=16, help="slices per block (default %(default)s)")
    g.add_argument("--blocks", type=int, default=3, help="disjoint blocks of the volume (default %(default)s)")
    g.add_argument("--size", type=int, default=256, help="in-plane size (default %(default)s)")
    g.add_argument("--z-cap", choices=("none", "start"), default="none",
                   help="start: a configuration whose inter-slice error mean|D_z(x - x_true)| exceeds its 3-D TV "
                   "start's on a block is infeasible (issue 34: z-coherence no worse than 3-D TV)")
    g.add_argument("--allow-training-volume", action="store_true",
                   help="--store even when the prior was trained on --volume (its card says so)")
    p.add_argument("--max-nfe", type=int, default=None,
                   help="only configurations with at most this many network evaluations per image (slice) and sample")
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


def _volume_problem(args: argparse.Namespace) -> dict[str, Any]:
    """The volume methods' tuning problem: blocks of the tuning volume, noiseless, ``--views``."""
    from medrecon.operators import ParallelBeamCT

    if args.pool_noisy:
        raise SystemExit("--pool-noisy: the volume methods are tuned on noiseless measurements")
    name = args.prior or "ct-256"
    prior = ScorePrior.load(name, device=args.device)
    if mbir3d.trained_on(prior, args.volume):
        print(f"# warning: {name} was trained on {args.volume}: hold it out of training, or pass another --volume")
    x = mbir3d.tuning_volumes(args.volume, args.size, args.slices, args.blocks)
    A = ParallelBeamCT.sparse_view(args.size, args.views)  # noqa: N806
    caps = None
    if args.z_cap == "start":  # the z-error of the 3-D TV start of each block (benchmarks/mbir3d.py's tv3d row)
        caps = [z_error(reconstruct(A(v), A, method="tv", axes=("z", "y", "x")).mean, v) for v in x]
        print(f"# z-error caps (3-D TV start, HU): {', '.join(f'{c:.2f}' for c in caps)}")
    return {"prior": prior, "name": name, "A": A, "x": x, "z_cap": caps,
            "noise": None, "setting": f"{args.volume}: {args.blocks} × {args.slices} slices, {args.views} views",
            "rows": f"blocks of {args.slices}", "peak": recon.HU_WIDTH,
            "trained_on": mbir3d.trained_on(prior, args.volume)}


def _slice_problem(args: argparse.Namespace) -> dict[str, Any]:
    """The 2-D methods' tuning problem: the tuning rows of ``benchmarks/recon.py``."""
    by_name = {c.name: c for c in recon.CONFIGS}
    found = [c for c in recon.select_configs(args.setting) if c.name == args.setting]
    if not found:
        raise SystemExit(f"--setting: unknown {args.setting!r}; known: {', '.join(by_name)}, ct-la<arc>")
    cfg = found[0]
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

    return {"prior": prior, "name": name, "A": A, "x": x, "noise": noise, "setting": cfg.name, "rows": rows,
            "peak": recon.HU_WIDTH if cfg.modality == "ct" else 1.0, "pooled_noisy": noisy is not None}


def _run(args: argparse.Namespace) -> dict[str, Any]:
    volume = args.method in mbir3d.VOLUME_METHODS
    prob = _volume_problem(args) if volume else _slice_problem(args)
    prior, name, A, x, noise, peak = (prob[k] for k in ("prior", "name", "A", "x", "noise", "peak"))  # noqa: N806
    if volume and args.store and prob["trained_on"] and not args.allow_training_volume:
        raise SystemExit(f"--store: {name} was trained on {args.volume}; settings tuned on it are not stored "
                         "(--allow-training-volume stores them anyway)")
    space = _space(args.space, args.method)
    fixed = json.loads(args.fixed) if args.fixed else None
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
        max_nfe=args.max_nfe,
        z_error_cap=prob.get("z_cap"),
        log=lambda m: print(f"# {m}", flush=True),
    )
    wall = time.perf_counter() - t0
    keys = sorted({k for t in res["trials"] for k in t["settings"]})
    capped = res.get("z_error_cap") is not None
    head = (
        " ".join(f"{k:>8s}" for k in keys)
        + f" {'PSNR dB':>8s} {'images':>6s} {'s/run':>7s} {'NFE':>5s}"
        + (f" {'z-err HU':>8s} {'ok':>3s}" if capped else "")
    )
    print(
        f"tuning {args.method} on {prob['setting']} ({res['operator_key']}), rows {prob['rows']}, fixed {fixed or {}}"
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
        z = f" {t['z_error']:8.2f} {'yes' if t['feasible'] else 'no':>3s}" if capped else ""
        print(f"{vals} {t['psnr']:8.2f} {t['n_images']:6d} {t['seconds']:7.1f} {t['nfe']:5d}{z}{mark}")
    gain = res["best_psnr"] - res["defaults_psnr"]
    defaults_trial = next(t for t in res["trials"] if t["settings"] == res["defaults"])
    # under a z-error cap, a feasible winner replaces defaults that break the cap, whatever its PSNR
    fixes_cap = capped and res["best_feasible"] and not defaults_trial["feasible"]
    if capped:
        print(f"z-error caps (HU): {', '.join(f'{c:.2f}' for c in res['z_error_cap'])}; best feasible: "
              f"{res['best_feasible']}; defaults feasible: {defaults_trial['feasible']}")
    print(
        f"best {res['best']} {res['best_psnr']:.2f} dB vs defaults {res['defaults']} {res['defaults_psnr']:.2f} dB "
        f"(+{gain:.2f} dB), {res['runs']} runs, {wall:.0f} s"
    )
    stored = None
    card_entry, stale = tuned_entry(prior.card, A, args.method)
    # store a gain, or the best measured on these weights where the card holds none for them
    if args.store and (gain > 0 or fixes_cap or not card_entry or stale):
        store_tuned_defaults(
            args.store, res["operator_key"], {args.method: {**(fixed or {}), **res["best"]}}
        )
        stored = str(args.store)
        print(f"stored in {stored} under tuned/{res['operator_key']}/{args.method}")
    out = {
        "bench": "tune",
        "device": args.device if args.device != "cpu" else f"cpu ({platform.machine()})",
        "threads": torch.get_num_threads(),
        "setting": prob["setting"],
        "rows": prob["rows"],
        "pooled_noisy": prob.get("pooled_noisy", False),
        "volume": args.volume if volume else None,
        "trained_on_volume": prob.get("trained_on"),
        "max_nfe": args.max_nfe,
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
