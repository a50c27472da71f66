"""Calibrate a diffusion method's uncertainty map on validation *tuning* slices, per setting.

For each measurement setting of ``benchmarks/recon.py`` (``--settings ct-23v,mri-8x-equispaced``)
runs :func:`medrecon.tuning.calibrate` on the tuning rows (CT rows 7 and 24 of
``ct/val.npz``, the middle slices of the first two MRI subjects; never the slices recon.py
reports): the factor ``c`` with ``|error| ≤ 2·c·std`` on ``--level`` of the pixels.  A CT setting
pools its noiseless measurements with those of its ``-noisy`` twin (same operator, so the same
card entry must serve both; ``--no-noisy`` to fit on noiseless data only).  Settings: the prior
card's tuned defaults, then ``--fixed`` (use the ``--steps`` recon.py will run with, e.g.
``'{"steps": 100}'``: the factor is only applied to runs with the calibrated settings).  Prints a
table and one JSON line; ``--store`` writes each factor, with the sha256 of the weights, to
``card["calibration"][operator_key][method]`` of the prior it was measured with
(``--prior-ct`` / ``--prior-mri``: a registry name or a card path).

The volume methods (``--method dds3d`` or ``mbir3d``) are calibrated on volumes: ``--blocks``
blocks of ``--slices`` contiguous slices of the tuning volume (``--volume``, default
``benchmarks/mbir3d.TUNING_VOLUME``, as ``benchmarks/tune.py``), noiseless parallel-beam CT at each
of ``--views`` (operator keys ``parallel-<views>``).

    python benchmarks/calibrate.py --settings ct-23v --fixed '{"steps": 100}'
    python benchmarks/calibrate.py --settings ct,mri --fixed '{"steps": 100}' --store
    python benchmarks/calibrate.py --method dds3d --views 8,23,60 --slices 16 --blocks 3 --store
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
from medrecon.tuning import calibrate, store_calibration  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", default="ct-23v", help="recon.py setting names or prefixes (noiseless ones)")
    p.add_argument("--method", default="ccdf")
    p.add_argument("--prior-ct", default="ct-256", help="registry name or card path")
    p.add_argument("--prior-mri", default="mri-256", help="registry name or card path")
    p.add_argument("--samples", type=int, default=4, help="posterior samples per reconstruction")
    p.add_argument("--level", type=float, default=0.95, help="share of pixels inside ±2·c·std")
    p.add_argument("--fixed", default=None, help="JSON settings, e.g. '{\"steps\": 100}'")
    p.add_argument("--no-noisy", action="store_true", help="CT: do not pool the noisy twin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--store", action="store_true", help="write the factors into the priors' cards")
    g = p.add_argument_group("volume methods (dds3d, mbir3d)")
    g.add_argument("--volume", default=mbir3d.TUNING_VOLUME, help="tuning volume (default %(default)s)")
    g.add_argument("--views", default="8,23,60", help="comma-separated parallel-beam view counts")
    g.add_argument("--slices", type=int, default=16, help="slices per block (default %(default)s)")
    g.add_argument("--blocks", type=int, default=3, help="disjoint blocks of the volume (default %(default)s)")
    g.add_argument("--size", type=int, default=256, help="in-plane size (default %(default)s)")
    g.add_argument("--allow-training-volume", action="store_true",
                   help="--store even when the prior was trained on --volume (its card says so)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Calibrate, print the table and the JSON line; return the JSON dict."""
    return recon.with_two_threads(_run, parse_args(argv))


def _selected(spec: str) -> list[recon.Config]:
    """The noiseless settings ``spec`` names (a CT setting brings its noisy twin itself)."""
    configs = [c for c in recon.select_configs(spec) if not c.name.endswith("-noisy")]
    if not configs:
        known = ", ".join(c.name for c in recon.CONFIGS)
        raise SystemExit(f"--settings: {spec!r} names no noiseless setting; known: {known}")
    return configs


def _volume_results(args: argparse.Namespace, fixed: dict[str, Any]) -> list[dict[str, Any]]:
    """Calibrate a volume method on blocks of the tuning volume at each view count."""
    from medrecon.operators import ParallelBeamCT

    prior = ScorePrior.load(args.prior_ct, device=args.device)
    trained = mbir3d.trained_on(prior, args.volume)
    if trained:
        print(f"# warning: {args.prior_ct} was trained on {args.volume}: hold it out of training, or pass another --volume")
        if args.store and not args.allow_training_volume:
            raise SystemExit(f"--store: {args.prior_ct} was trained on {args.volume}; factors fitted on it are not "
                             "stored (--allow-training-volume stores them anyway)")
    x = mbir3d.tuning_volumes(args.volume, args.size, args.slices, args.blocks).to(args.device)
    results = []
    for views in (int(v) for v in args.views.split(",")):
        A = ParallelBeamCT.sparse_view(args.size, views)  # noqa: N806
        res = calibrate(prior, lambda i, A=A: A, x, method=args.method, n_samples=args.samples, settings=fixed,
                        level=args.level, seed=args.seed, log=lambda m: print(f"# {m}", flush=True))
        res.update(setting=f"{views} views", pooled_noisy=False, prior=args.prior_ct, volume=args.volume,
                   trained_on_volume=trained, rows=f"{args.blocks} blocks of {args.slices}")
        if args.store:
            store_calibration(_card_path(args.prior_ct), res)
            res["stored"] = True
        results.append(res)
    return results


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.method in mbir3d.VOLUME_METHODS:
        fixed = json.loads(args.fixed) if args.fixed else {}
        t_all = time.perf_counter()
        return _report(args, fixed, _volume_results(args, fixed), t_all)
    by_name = {c.name: c for c in recon.CONFIGS}
    data = recon.load_data(recon.data_root(), True, args.crop)
    fixed = json.loads(args.fixed) if args.fixed else {}
    priors: dict[str, Any] = {}
    results, t_all = [], time.perf_counter()
    for cfg in _selected(args.settings):
        if cfg.modality not in data:
            print(f"# {cfg.name}: no {cfg.modality} validation data under {recon.data_root()}, skipped")
            continue
        d = data[cfg.modality]
        name = args.prior_ct if cfg.modality == "ct" else args.prior_mri
        if name not in priors:
            priors[name] = ScorePrior.load(name, device=args.device)
        A = cfg.build(d["size"])  # noqa: N806
        x = recon.ground_truth(d, d["tune"]).to(args.device)
        twin = by_name.get(f"{cfg.name}-noisy")
        pooled = twin is not None and not args.no_noisy
        n = x.shape[0]
        images = torch.cat([x, x]) if pooled else x

        def noise(y: torch.Tensor, i: int, twin=twin, n=n, x=x, A=A) -> torch.Tensor:  # noqa: N803
            return recon.measure(twin, A, x[i - n : i - n + 1], args.seed + i) if i >= n else y

        res = calibrate(
            priors[name], lambda i, A=A: A, images, method=args.method, n_samples=args.samples,
            settings=fixed, noise=noise if pooled else None, level=args.level, seed=args.seed,
            log=lambda m: print(f"# {m}", flush=True),
        )
        res.update(setting=cfg.name, pooled_noisy=pooled, prior=name, rows=d["tune"])
        if args.store:
            store_calibration(_card_path(name), res)
            res["stored"] = True
        results.append(res)
    return _report(args, fixed, results, t_all)


def _report(args: argparse.Namespace, fixed: dict[str, Any], results: list[dict[str, Any]], t_all: float) -> dict[str, Any]:
    """Print the table and the JSON line; return the JSON dict."""
    head = f"{'setting':22s} {'key':12s} {'method':6s} {'c':>7s} {'cov raw':>8s} {'cov cal':>8s} {'Spearman':>8s} {'s':>6s}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['setting'] + (' (+noisy)' if r['pooled_noisy'] else ''):22s} {r['operator_key']:12s} "
            f"{r['method']:6s} {r['std_scale']:7.3f} {r['coverage_raw']:8.3f} {r['coverage_calibrated']:8.3f} "
            f"{r['spearman_raw']:8.3f} {r['seconds']:6.0f}"
        )
    out = {
        "bench": "calibrate",
        "device": args.device if args.device != "cpu" else f"cpu ({platform.machine()})",
        "threads": torch.get_num_threads(),
        "samples": args.samples,
        "level": args.level,
        "fixed": fixed,
        "results": results,
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    print(json.dumps(out), flush=True)
    return out


def _card_path(name: str) -> Path:
    """The card file of a registry name or a card path."""
    p = Path(name)
    if p.suffix == ".json" and p.is_file():
        return p
    from medrecon.priors.registry import shipped_registry

    return shipped_registry().card_path(name)


if __name__ == "__main__":
    main()
