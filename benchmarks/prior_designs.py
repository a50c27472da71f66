"""Compare prior designs: trainer checkpoints (EMA weights) on a validation set.

Each checkpoint's EMA network denoises the validation slices by Tweedie's formula at
σ ∈ {0.02, 0.05, 0.1, 0.2} (same noise draws for every design); the table gives the mean PSNR
(peak 1, normalised space), the training step and wall time of each checkpoint.  Compare
designs at the same step (``--max-steps`` stops a run at a chosen step; it resumes exactly
afterwards).  Last line: JSON.

    python benchmarks/prior_designs.py --val mri/val.npz --every 2 \\
        ~/.cache/medrecon/train/mri-256/ve_800.pt ~/.cache/medrecon/train/mri-256-vp/last.pt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict:
    from medrecon.priors.networks import ScoreNet
    from medrecon.priors.train import TrainConfig, _cfg_from_dict, load_checkpoint, load_slices, validate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="trainer checkpoints (last.pt, step_N.pt)")
    p.add_argument("--val", required=True, help="validation .npz, relative to MEDRECON_DATA or a path")
    p.add_argument("--every", type=int, default=1, help="use every k-th validation slice")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    images = None
    for path in a.checkpoints:
        ck = load_checkpoint(path)
        cfg = TrainConfig(**_cfg_from_dict(ck["config"]))
        if images is None:
            images = load_slices([a.val], cfg.modality)[:: a.every]
        net = ScoreNet(cfg.network_spec(), cfg.build_sde(), cfg.sigma_data)
        net.load_state_dict(ck["ema"])
        with torch.no_grad():
            res = validate(net, images)
        design = f"{cfg.sde.upper()} {cfg.size} patch {cfg.patch_size} batch {cfg.batch_size}"
        rows.append({"checkpoint": os.fspath(path), "run": cfg.run, "design": design, "step": int(ck["step"]),
                     "wall_s": round(float(ck["wall_s"]), 1), **{k: round(v, 3) for k, v in res.items()}})
    keys = [k for k in rows[0] if k.startswith("psnr_")]
    print(f"prior designs on {a.val} ({len(images)} slices): Tweedie denoising PSNR dB")
    print(f"{'run':<14} {'design':<28} {'step':>6} " + " ".join(f"{k.replace('psnr_sigma', 'σ='):>8}" for k in keys))
    for r in rows:
        print(f"{r['run']:<14} {r['design']:<28} {r['step']:>6} " + " ".join(f"{r[k]:8.2f}" for k in keys))
    out = {"bench": "prior_designs", "val": a.val, "slices": len(images), "results": rows}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
