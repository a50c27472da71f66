"""Compare prior designs: trainer checkpoints (EMA weights) or exported priors on a validation set.

Two judgements, as issue 23 asks:

* **Denoising.** Each network denoises the validation slices by Tweedie's formula at
  σ ∈ {0.02, 0.05, 0.1, 0.2} (``--sigmas``; the same noise draws for every design); the table gives the mean
  PSNR (peak 1, normalised space), the training step and wall time of each design.
* **Reconstruction** (``--recon ct-10v,ct-23v``, exported priors only). Each prior reconstructs
  the chosen ``ct/val.npz`` rows (``--rows``) with one sampler (``--method``, default DDS) at the
  *same* settings for every design: the values tuned for the ``--settings-from`` prior's card
  per operator (default the shipped ct-256), so that the design, not the sampler, differs.  TV at
  the weight ``benchmarks/recon.py`` swept on its tuning rows is measured in the same run.

Compare designs at equal training cost (``--max-steps`` / ``--max-time-s`` stop a run; it
resumes exactly afterwards).  Last line: JSON.

    python benchmarks/prior_designs.py --val mri/val.npz --every 2 \\
        ~/.cache/medrecon/train/mri-256/ve_800.pt ~/.cache/medrecon/train/mri-256-vp/last.pt
    python benchmarks/prior_designs.py --val ct/val.npz --recon ct-10v,ct-23v \\
        ct-256 cache/grown/weights/ct-256-grown.json cache/pos/weights/ct-256-pos.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _recon_module():
    """benchmarks/recon.py (a script, loaded by path): settings, measurements, metrics, TV sweep."""
    name = "_bench_recon_for_designs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("recon.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def _load_design(path: str) -> dict[str, Any]:
    """``{"net", "prior", "run", "design", "step", "wall_s"}`` of a checkpoint (prior None) or of an
    exported prior (a card path or a registry name)."""
    from medrecon.priors import ScorePrior
    from medrecon.training import TrainConfig, load_ema_net
    from medrecon.training.config import cfg_from_dict

    if path.endswith(".pt"):
        net, cfg, ck = load_ema_net(path)
        return {"net": net, "prior": None, "run": cfg.run, "design": _describe(cfg), "modality": cfg.modality,
                "step": int(ck["step"]), "wall_s": round(float(ck["wall_s"]), 1)}
    prior = ScorePrior.load(path)
    training = prior.card.get("training", {})
    cfg = TrainConfig(**cfg_from_dict(training.get("config", {})))
    return {"net": prior.net, "prior": prior, "run": prior.card.get("name", path), "design": _describe(cfg),
            "modality": prior.card.get("modality", cfg.modality), "step": int(training.get("steps", 0)),
            "wall_s": round(float(training.get("wall_time_s", 0.0)), 1)}


def _describe(cfg: Any) -> str:
    patches = "/".join(map(str, cfg.patch_sizes)) if cfg.patch_sizes else str(cfg.patch_size)
    return f"{cfg.sde.upper()} {cfg.size} patch {patches}{' +xy' if cfg.coords else ''}"


def reconstruct_rows(designs: list[dict[str, Any]], settings: list[str], rows: list[int], method: str,
                     settings_from: str, samples: int, seed: int, log) -> list[dict[str, Any]]:
    """Per (setting, design) the mean PSNR / SSIM over ``rows`` of ``method`` with identical
    settings for every design, and TV's in the same run."""
    from medrecon.priors import ScorePrior
    from medrecon.solvers.presets import tuned_defaults

    rb = _recon_module()
    data = rb.load_data(rb.data_root(), False, None).get("ct")
    if data is None:
        raise SystemExit(f"--recon: no ct/val.npz under {rb.data_root()} (set MEDRECON_DATA)")
    bad = [r for r in rows if not 0 <= r < len(data["images"])]
    if bad:
        raise SystemExit(f"--rows: {bad} are not rows of ct/val.npz (0..{len(data['images']) - 1})")
    reference = ScorePrior.load(settings_from).card
    by_name = {c.name: c for c in rb.CONFIGS}
    out = []
    for name in settings:
        if name not in by_name or by_name[name].modality != "ct":
            raise SystemExit(f"--recon: {name!r} is not a CT setting of benchmarks/recon.py "
                             f"({', '.join(c.name for c in rb.CONFIGS if c.modality == 'ct')})")
        cfg = by_name[name]
        A = cfg.build(data["size"])  # noqa: N806
        x = rb.ground_truth(data, rows)
        y = rb.measure(cfg, A, x, seed)
        lam = rb.tuned_weights([cfg], {"ct": data}, ["tv"], seed, True, log)[cfg.family]["tv"]["lam"]
        mean, _, _, wall = rb.run_method(cfg, A, y, "tv", {"lam": lam}, None, 1, None, seed)
        m = rb.slice_metrics(cfg, mean, None, x)
        out.append({"setting": name, "run": "TV", "method": "tv", "lam": lam, "psnr": round(float(np.mean(m["psnr"])), 3),
                    "ssim": round(float(np.mean(m["ssim"])), 4), "wall_s": round(wall, 1)})
        log(f"# {name}: TV λ {lam:.3g}: {out[-1]['psnr']:.2f} dB")
        chosen = tuned_defaults(reference, A, method)
        for d in designs:
            mean, _, info, wall = rb.run_method(cfg, A, y, method, chosen, d["prior"], samples, None, seed)
            m = rb.slice_metrics(cfg, mean, None, x)
            out.append({"setting": name, "run": d["run"], "method": method, "settings": info.get("settings", chosen),
                        "psnr": round(float(np.mean(m["psnr"])), 3), "ssim": round(float(np.mean(m["ssim"])), 4),
                        "psnr_per_row": [round(v, 2) for v in m["psnr"]], "wall_s": round(wall, 1)})
            log(f"# {name}: {d['run']} {method}: {out[-1]['psnr']:.2f} dB ({wall:.0f} s)")
    return out


def main(argv: list[str] | None = None) -> dict:
    from medrecon.training import load_slices, validate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("designs", nargs="+", help="trainer checkpoints (last.pt, step_N.pt) or priors (card path, registry name)")
    p.add_argument("--val", required=True, help="validation .npz, relative to MEDRECON_DATA or a path")
    p.add_argument("--every", type=int, default=1, help="use every k-th validation slice")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recon", default=None, help="also reconstruct: CT settings of benchmarks/recon.py, e.g. ct-10v,ct-23v")
    p.add_argument("--rows", default="2,7,13,24,27", help="ct/val.npz rows to reconstruct (--recon)")
    p.add_argument("--method", default="dds", help="sampler of the reconstructions (--recon)")
    p.add_argument("--settings-from", default="ct-256", help="prior whose card's tuned settings every design uses")
    p.add_argument("--samples", type=int, default=2, help="posterior samples per reconstruction (--recon)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sigmas", default="0.02,0.05,0.1,0.2",
                   help="noise levels of the Tweedie denoising (normalised units), e.g. 0.02,0.05,0.1,0.2,0.5,1,2")
    a = p.parse_args(argv)
    sigmas = tuple(float(s) for s in a.sigmas.split(",") if s.strip())
    torch.set_num_threads(a.threads)
    designs = [_load_design(path) for path in a.designs]
    seen: dict[str, int] = {}
    for d in designs:  # two priors of one name (a shipped card and an earlier copy): tell them apart
        seen[d["run"]] = seen.get(d["run"], 0) + 1
        if seen[d["run"]] > 1:
            d["run"] = f"{d['run']}#{seen[d['run']]}"
    if a.recon and any(d["prior"] is None for d in designs):
        raise SystemExit("--recon needs exported priors (cards), not trainer checkpoints: export with "
                         "`medrecon train --run RUN --export DIR` first")
    rows = []
    images = None
    for path, d in zip(a.designs, designs, strict=True):
        if images is None:
            images = load_slices([a.val], d["modality"])[:: a.every]
        t0 = time.perf_counter()
        with torch.no_grad():
            res = validate(d["net"], images, sigmas)
        rows.append({"checkpoint": os.fspath(path), "run": d["run"], "design": d["design"], "step": d["step"],
                     "wall_s": d["wall_s"], **{k: round(v, 3) for k, v in res.items()},
                     "eval_s": round(time.perf_counter() - t0, 1)})
    keys = [k for k in rows[0] if k.startswith("psnr_")]
    print(f"prior designs on {a.val} ({len(images)} slices): Tweedie denoising PSNR dB")
    print(f"{'run':<16} {'design':<34} {'step':>6} {'train h':>7} "
          + " ".join(f"{k.replace('psnr_sigma', 'σ='):>8}" for k in keys))
    for r in rows:
        print(f"{r['run']:<16} {r['design']:<34} {r['step']:>6} {r['wall_s'] / 3600:7.2f} "
              + " ".join(f"{r[k]:8.2f}" for k in keys))
    out: dict[str, Any] = {"bench": "prior_designs", "val": a.val, "slices": len(images), "results": rows}
    if a.recon:
        recon_rows = [int(s) for s in a.rows.split(",") if s.strip()]
        rec = reconstruct_rows(designs, [s.strip() for s in a.recon.split(",") if s.strip()], recon_rows,
                               a.method, a.settings_from, a.samples, a.seed, lambda msg: print(msg, flush=True))
        print(f"\nreconstruction on ct/val.npz rows {recon_rows}: mean PSNR dB (SSIM); {a.method} with "
              f"{a.settings_from}'s tuned settings for every design, {a.samples} samples")
        settings = list(dict.fromkeys(r["setting"] for r in rec))
        runs = list(dict.fromkeys(r["run"] for r in rec))
        print(f"{'run':<16} " + " ".join(f"{s:>16}" for s in settings) + " " + " ".join(f"{'vs TV ' + s:>14}" for s in settings))
        for run in runs:
            cells, gains = [], []
            for s in settings:
                r = next(r for r in rec if r["run"] == run and r["setting"] == s)
                tv = next(r for r in rec if r["run"] == "TV" and r["setting"] == s)
                cells.append(f"{r['psnr']:7.2f} ({r['ssim']:.3f})")
                gains.append(f"{r['psnr'] - tv['psnr']:+14.2f}")
            print(f"{run:<16} " + " ".join(f"{c:>16}" for c in cells) + " " + " ".join(gains))
        out.update({"recon_rows": recon_rows, "recon_method": a.method, "settings_from": a.settings_from,
                    "recon": rec})
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
