"""Benchmark the shipped score priors: Tweedie denoising vs classical denoisers, and samples.

For CT (``ct/val.npz``) and MRI (``mri/val.npz``) under ``$MEDRECON_DATA``:

* PSNR (peak 1 in the prior's normalised space; for CT that is the HU window [-1024, 3071]) of
  the prior's one-step Tweedie denoiser at sigma in {0.02, 0.05, 0.1, 0.2}, against a Gaussian
  filter and a TV (Chambolle) denoiser, each at its best setting per sigma — tuned on the same
  validation slices, which favours the baselines;
* with ``--train-gap``, the same Tweedie PSNR on as many training slices of the validation
  slices' own collection (``ct/train.npz``, ``mri/train.npz``; spread evenly, the same noise
  draws): a denoiser that does much better on slices it trained on than on unseen ones of the
  same kind is limited by its data, one that does no better by its steps or size.  The other
  training sources differ in content (head CTs, T1 volumes on a zero canvas) and would confound it;
* a PNG grid of unconditional samples (predictor–corrector), and for each sample the RMSE to its
  nearest training slice, beside the same distance for the validation slices (a new image is
  about that far from the training set; a much smaller value would mean memorisation).

Prints a table and the targets of issue 23 (:data:`TARGETS`), then one JSON line with
``ct_denoise_gain_vs_tv_sigma{s}`` and ``mri_denoise_gain_vs_tv_sigma{s}`` (dB, prior minus best
TV) and ``targets``.  PNGs go to ``--out``
(default ``~/.cache/medrecon/bench/priors``; they show patient data, keep them out of git).

    python benchmarks/priors.py --quick
    python benchmarks/priors.py --ct-prior ~/.cache/medrecon/export/ct-256.json --skip-mri
    python benchmarks/priors.py --skip-ct --samples 0 --mri-val mri/nifti/IXI012-HH-1211_T1.nii.gz
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from medrecon.priors import ScorePrior
from medrecon.priors.registry import shipped_registry
from medrecon.training import CT_GROWN_DATA, PRESETS, data_root, load_slices, save_grid_png
from medrecon.solvers.presets import sample_unconditional

SIGMAS = (0.02, 0.05, 0.1, 0.2)


def psnr(x: np.ndarray, ref: np.ndarray) -> float:
    """PSNR with peak 1."""
    return 10 * math.log10(1.0 / max(float(np.mean((x - ref) ** 2)), 1e-20))


def best_classical(clean: np.ndarray, noisy: np.ndarray, kind: str) -> tuple[float, float]:
    """Mean PSNR of the best setting of a Gaussian filter or TV denoiser; returns (psnr, setting)."""
    from scipy.ndimage import gaussian_filter
    from skimage.restoration import denoise_tv_chambolle

    if kind == "gauss":
        grid = [0.3, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0]

        def f(im, s):
            return gaussian_filter(im, s)
    else:
        grid = [0.005, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.25, 0.4]

        def f(im, s):
            return denoise_tv_chambolle(im, weight=s)

    best = (-1.0, grid[0])
    for s in grid:
        v = float(
            np.mean([psnr(np.clip(f(n, s), 0, 1), c) for c, n in zip(clean, noisy, strict=True)])
        )
        best = max(best, (v, s))
    return best


def tweedie_psnr(prior: ScorePrior, clean: torch.Tensor, noisy: torch.Tensor, sigma: float) -> float:
    """Mean PSNR of the prior's one-step Tweedie denoiser on ``noisy`` (N, 1, H, W) against ``clean``."""
    with torch.no_grad():
        den = torch.cat([prior.denoise_sigma(noisy[i : i + 4], sigma) for i in range(0, len(noisy), 4)])
    return float(np.mean([psnr(a, b) for a, b in zip(den[:, 0].clamp(0, 1).numpy(), clean[:, 0].numpy(),
                                                       strict=True)]))


def evaluate(
    prior: ScorePrior,
    val: torch.Tensor,
    train: torch.Tensor,
    n_samples: int,
    sample_steps: int,
    sample_size: int,
    out: Path,
    tag: str,
    train_gap: torch.Tensor | None = None,
) -> dict:
    """Denoising table rows, samples and nearest-training distances for one modality."""
    gen = torch.Generator().manual_seed(0)
    clean = val.unsqueeze(1).float()
    seen = None
    if train_gap is not None:  # training slices of the validation's collection, spread evenly
        seen = train_gap[torch.linspace(0, len(train_gap) - 1, len(val)).round().long()].unsqueeze(1).float()
    gen_seen = torch.Generator().manual_seed(0)  # the training slices' noise: the same draws as the validation's
    rows = []
    for s in SIGMAS:
        noisy = clean + s * torch.randn(clean.shape, generator=gen)
        c, n = clean[:, 0].numpy(), noisy[:, 0].numpy()
        p_prior = tweedie_psnr(prior, clean, noisy, s)
        p_noisy = float(np.mean([psnr(np.clip(a, 0, 1), b) for a, b in zip(n, c, strict=True)]))
        g, gs = best_classical(c, n, "gauss")
        tv, tvs = best_classical(c, n, "tv")
        rows.append(
            {
                "modality": tag,
                "sigma": s,
                "noisy": p_noisy,
                "gauss": g,
                "gauss_setting": gs,
                "tv": tv,
                "tv_weight": tvs,
                "prior": p_prior,
                "gain_vs_tv": p_prior - tv,
            }
        )
        if seen is not None:
            p_seen = tweedie_psnr(prior, seen, seen + s * torch.randn(seen.shape, generator=gen_seen), s)
            rows[-1].update({"prior_train": p_seen, "train_gap": p_seen - p_prior})
    res: dict = {"rows": rows}
    if n_samples:
        t0 = time.perf_counter()
        with torch.no_grad():
            x = sample_unconditional(
                prior,
                (n_samples, 1, sample_size, sample_size),
                n_steps=sample_steps,
                generator=torch.Generator().manual_seed(1),
            ).clamp(0, 1)
        res["sample_time_s"] = time.perf_counter() - t0
        out.mkdir(parents=True, exist_ok=True)
        save_grid_png(x, out / f"{tag}_samples.png")
        tr = train.float().flatten(1)
        if sample_size == train.shape[-1]:
            d_s = torch.cdist(x.flatten(1), tr).min(dim=1).values / math.sqrt(tr.shape[1])
            d_v = torch.cdist(val.float().flatten(1), tr).min(dim=1).values / math.sqrt(tr.shape[1])
            res["sample_nn_rmse"] = [round(float(v), 4) for v in d_s]
            res["val_nn_rmse_median"] = round(float(d_v.median()), 4)
            res["val_nn_rmse_min"] = round(float(d_v.min()), 4)
    return res


#: issue 23: the Tweedie denoiser's gain over the best TV denoiser (dB) per (modality, sigma)
TARGETS = {("ct", 0.05): 5.0, ("ct", 0.1): 5.0, ("mri", 0.05): 3.0}


def check_targets(summary: dict[str, float]) -> list[dict]:
    """Each target of :data:`TARGETS` that was measured: ``{"target", "value", "ok"}``."""
    out = []
    for (tag, sigma), margin in TARGETS.items():
        value = summary.get(f"{tag}_denoise_gain_vs_tv_sigma{sigma}")
        if value is not None:
            out.append({"target": f"{tag} σ={sigma}: Tweedie ≥ best TV + {margin:g} dB", "value": value,
                        "ok": value >= margin})
    return out


def main() -> None:
    """Run the benchmark (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few slices and samples (minutes)")
    ap.add_argument("--ct-prior", default="ct-256", help="registry name or card path")
    ap.add_argument("--mri-prior", default="mri-256", help="registry name or card path")
    ap.add_argument("--skip-ct", action="store_true")
    ap.add_argument("--skip-mri", action="store_true")
    ap.add_argument("--val-slices", type=int, default=None)
    ap.add_argument("--mri-val", default=None,
                    help="MRI validation source instead of mri/val.npz: an .npz or a volume (NIfTI file, DICOM "
                    "folder), e.g. the held-out T1 mri/nifti/IXI012-HH-1211_T1.nii.gz")
    ap.add_argument("--train-gap", action="store_true",
                    help="also the Tweedie PSNR on as many slices of {ct,mri}/train.npz (the validation's collection): "
                    "the gap says whether the prior is limited by its data")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--sample-steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path.home() / ".cache/medrecon/bench/priors"))
    a = ap.parse_args()
    if a.train_gap and a.mri_val:
        ap.error("--train-gap compares with the training slices of mri/val.npz's collection: not with --mri-val")
    torch.set_num_threads(a.threads)
    n_val = a.val_slices or (6 if a.quick else 10_000)
    n_samp = a.samples if a.samples is not None else (2 if a.quick else 8)
    steps = a.sample_steps or (60 if a.quick else 300)
    known = shipped_registry().names()
    results, summary = [], {}
    for tag, name, skip in (("ct", a.ct_prior, a.skip_ct), ("mri", a.mri_prior, a.skip_mri)):
        if skip or (name not in known and not Path(name).exists()):
            print(
                f"[{tag}] skipped: prior {name!r} not available" if not skip else f"[{tag}] skipped"
            )
            continue
        prior = ScorePrior.load(name)
        preset = PRESETS[f"{tag}-256"]
        val_all = load_slices([a.mri_val if tag == "mri" and a.mri_val else str(data_root() / f"{tag}/val.npz")], tag)
        val = val_all[:: max(1, len(val_all) // n_val)][:n_val]
        # the memorisation check runs over every slice a CT prior may have seen: the grown set
        train = load_slices(list(CT_GROWN_DATA if tag == "ct" else preset["data"]), tag)
        seen = load_slices([str(data_root() / f"{tag}/train.npz")], tag) if a.train_gap else None
        res = evaluate(prior, val, train, n_samp, steps, 256, Path(a.out), tag, seen)
        res["prior"] = str(name)
        res["steps_trained"] = prior.card.get("training", {}).get("steps")
        results.append(res)
        for r in res["rows"]:
            summary[f"{tag}_denoise_gain_vs_tv_sigma{r['sigma']}"] = round(r["gain_vs_tv"], 3)
            if "train_gap" in r:
                summary[f"{tag}_train_minus_val_sigma{r['sigma']}"] = round(r["train_gap"], 3)
    print(
        f"{'mod':4s} {'sigma':>6s} {'noisy':>7s} {'gauss':>7s} {'tv':>7s} {'prior':>7s} {'gain':>6s}"
        + (f" {'train':>7s} {'tr-val':>6s}" if a.train_gap else "") + "  (PSNR dB)"
    )
    for res in results:
        for r in res["rows"]:
            print(
                f"{r['modality']:4s} {r['sigma']:6.2f} {r['noisy']:7.2f} {r['gauss']:7.2f} "
                f"{r['tv']:7.2f} {r['prior']:7.2f} {r['gain_vs_tv']:+6.2f}"
                + (f" {r['prior_train']:7.2f} {r['train_gap']:+6.2f}" if "train_gap" in r else "")
            )
        if "sample_nn_rmse" in res:
            print(
                f"{res['rows'][0]['modality']}: sample→nearest-train RMSE {res['sample_nn_rmse']} "
                f"(val→train median {res['val_nn_rmse_median']}, min {res['val_nn_rmse_min']}); "
                f"sampling {res['sample_time_s']:.0f} s"
            )
    targets = check_targets(summary)
    for t in targets:
        mark = "–" if t["ok"] is None else ("met" if t["ok"] else "MISSED")
        print(f"target {t['target']}: {t['value']} dB ({mark})")
    print(
        json.dumps(
            {
                "bench": "priors",
                "targets": targets,
                "device": f"cpu ({platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} threads, {os.cpu_count()} cores)",
                "quick": a.quick,
                "results": results,
                **summary,
            }
        )
    )


if __name__ == "__main__":
    main()
