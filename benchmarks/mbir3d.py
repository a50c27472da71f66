"""3-D sparse-view CT: the volume methods (DDS-3D, mbir3d) against 3-D TV and slice-wise DDS.

The report volume is ``nifti/totalseg_example_ct.nii.gz`` of the development data (abdominal
CT, 3 mm isotropic, in no training set of the shipped priors), resampled in-plane to ``--size``
and cut to ``--slices`` contiguous central slices; parallel-beam CT at each of ``--views``,
noiseless.  Methods (``--methods``): ``tv3d`` (isotropic 3-D TV, the ``reconstruct(method="tv",
axes=("z", "y", "x"))`` defaults), ``dds`` (DDS slice by slice), ``ccdf`` (CCDF slice by
slice), ``dds3d`` and ``mbir3d`` (the volume methods, which start from that 3-D TV); the
diffusion rows use the presets and the prior card's tuned values for the operator key
(``parallel-<views>``), overridden by ``--overrides`` (JSON per method).

Prints, per view count, a table (PSNR and SSIM on (HU + 1024)/4096 with data range 1; the
inter-slice error mean|D_z(x − x_true)| in those units and in HU; the share of voxels whose
error lies within ±2 posterior std (coverage, with the card's calibration where it applies);
seconds; peak RSS), then the issue-34 targets and one JSON line.  Targets: the best volume
method ≥ 3-D TV + 1 dB at 23 and 60 views and never below 3-D TV at 8; its z-error no worse than
3-D TV's; the 64-slice, 23-view, 4-sample volume method in ≤ 5 minutes.

    python benchmarks/mbir3d.py                                     # 64 × 256², 8/23/60 views, 4 samples
    python benchmarks/mbir3d.py --slices 8 --size 128 --views 23    # a small check

The helpers :func:`read_volume`, :func:`volume_slices` and :func:`tuning_volumes` also give
``benchmarks/tune.py`` and ``benchmarks/calibrate.py`` their volumes: blocks of contiguous
slices of the tuning volume :data:`TUNING_VOLUME`, never the report volume.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medrecon.training.presets import CT_3D_TUNING_VOLUME  # noqa: E402

#: the volume the table reports on (in no training set)
REPORT_VOLUME = "nifti/totalseg_example_ct.nii.gz"
#: the contiguous CT volume the volume methods are tuned and calibrated on: a chest and upper
#: abdomen series of 109 slices at 2.5 mm steps, 1.35 mm pixels (ct/extra/SOURCES.md); held out
#: of ct-256's training data from campaign stage 3 on (the stages before trained on it: see
#: :func:`trained_on`)
TUNING_VOLUME = CT_3D_TUNING_VOLUME
HU_LOW, HU_WIDTH = -1024.0, 4096.0
VOLUME_METHODS = ("dds3d", "mbir3d")
SLICEWISE = ("dds", "ccdf")


def data_root() -> Path:
    """``MEDRECON_DATA`` (default: the shared development data beside the repository)."""
    return Path(os.environ.get("MEDRECON_DATA", ROOT.parent / "shared" / "data"))


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def read_volume(path: str | Path) -> np.ndarray:
    """A CT volume ``(Z, Y, X)`` in HU, float32: an ``.npz`` of the development data (``images``
    in z order), a NIfTI file or a DICOM series; a relative path is under :func:`data_root`."""
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = data_root() / p
    if not p.exists():
        raise SystemExit(f"volume not found: {p} (set MEDRECON_DATA)")
    if p.suffix == ".npz":
        d = np.load(p)
        vol = d["images"]
        if "z_position_mm" in d:
            vol = vol[np.argsort(d["z_position_mm"], kind="stable")]
        return vol.astype(np.float32)
    from medrecon.datasets import load_volume

    return np.asarray(load_volume(str(p)).array, dtype=np.float32)


def volume_slices(vol: np.ndarray, size: int, n_slices: int, first: int | None = None) -> torch.Tensor:
    """``n_slices`` contiguous slices from ``first`` (default: the central ones), resampled
    in-plane to ``size``², clipped to the HU window: ``(Z, 1, size, size)`` float32."""
    from skimage.transform import resize

    if n_slices > vol.shape[0]:
        raise SystemExit(f"the volume has {vol.shape[0]} slices; {n_slices} asked for")
    z0 = max(0, (vol.shape[0] - n_slices) // 2) if first is None else int(first)
    sub = vol[z0 : z0 + n_slices]
    if sub.shape[1:] != (size, size):
        sub = np.stack([resize(s, (size, size), order=1, preserve_range=True, anti_aliasing=True) for s in sub])
    return torch.from_numpy(np.ascontiguousarray(sub, dtype=np.float32)).clamp(HU_LOW, HU_LOW + HU_WIDTH - 1)[:, None]


def tuning_volumes(path: str | Path, size: int, n_slices: int, blocks: int) -> torch.Tensor:
    """``blocks`` disjoint blocks of ``n_slices`` contiguous slices, evenly spaced through the
    volume: ``(blocks, n_slices, 1, size, size)`` in HU (the items of ``medrecon.tuning.tune``)."""
    vol = read_volume(path)
    if blocks * n_slices > vol.shape[0]:
        raise SystemExit(f"{blocks} blocks of {n_slices} slices do not fit the {vol.shape[0]} slices of {path}")
    starts = np.linspace(0, vol.shape[0] - n_slices, blocks).round().astype(int)
    return torch.stack([volume_slices(vol, size, n_slices, int(z)) for z in starts])


def trained_on(prior: Any, path: str | Path) -> bool:
    """Whether ``path`` is among the files the prior's card says it was trained on, now or in an
    earlier stage of its training (``training.data_history``)."""
    training = (getattr(prior, "card", None) or {}).get("training", {})
    data = list(training.get("config", {}).get("data", []))
    for stage in training.get("data_history", []):
        data += stage.get("data", [])
    p = Path(path)
    try:
        rel = str(p.resolve().relative_to(data_root().resolve())) if p.is_absolute() else str(p)
    except ValueError:
        rel = str(p)
    return rel in set(data)


def metrics(x: torch.Tensor, ref: torch.Tensor, std: torch.Tensor | None = None) -> dict[str, float]:
    """PSNR / SSIM on (HU + 1024)/4096, the inter-slice error in those units and in HU, and the
    ±2·std coverage where a posterior std is given."""
    from medrecon.metrics import psnr, ssim
    from medrecon.tuning import z_error

    xn, rn = (x - HU_LOW) / HU_WIDTH, (ref - HU_LOW) / HU_WIDTH
    e = x - ref
    dz = z_error(x, ref)
    out = {"psnr": psnr(xn, rn, data_range=1.0), "ssim": ssim(xn, rn, data_range=1.0),
           "z_coherence": dz / HU_WIDTH, "z_coherence_hu": dz}
    if std is not None and float(std.max()) > 0:
        out["coverage_2sigma"] = float((e.abs() <= 2 * std).double().mean())
    return out


def _check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue-34 targets, judged where the rows allow (``ok`` None: not measured here)."""
    out = []
    by = {(r["views"], r["method"]): r for r in rows if "psnr" in r}
    for views in sorted({r["views"] for r in rows}):
        tv = by.get((views, "tv3d"))
        vol = [by[(views, m)] for m in VOLUME_METHODS if (views, m) in by]
        best = max(vol, key=lambda r: r["psnr"], default=None)
        need = 1.0 if views >= 23 else 0.0
        ok = None if tv is None or best is None else best["psnr"] >= tv["psnr"] + need
        out.append({"target": f"{views} views: best volume method ≥ 3-D TV + {need:g} dB", "ok": ok,
                    "best": best and best["method"], "margin_db": None if ok is None else
                    round(best["psnr"] - tv["psnr"], 3)})
        zok = None if tv is None or best is None else best["z_coherence"] <= tv["z_coherence"]
        out.append({"target": f"{views} views: its z-error ≤ 3-D TV's", "ok": zok})
    timed = [r for r in rows if r["method"] in VOLUME_METHODS and r["views"] == 23 and "seconds" in r
             and r["slices"] == 64 and r["size"] == 256 and r["samples"] == 4]
    fastest = min((r["seconds"] for r in timed), default=None)
    out.append({"target": "64 × 256², 23 views, 4 samples: ≤ 300 s (2 cores)", "ok": None if fastest is None
                else fastest <= 300, "seconds": fastest})
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--volume", default=REPORT_VOLUME, help="CT volume (default: the report volume)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--views", default="8,23,60", help="comma-separated view counts")
    p.add_argument("--samples", type=int, default=4, help="posterior samples of the diffusion rows")
    p.add_argument("--methods", default="tv3d,dds,dds3d,mbir3d")
    p.add_argument("--prior", default="ct-256", help="registry name or card path")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="network arithmetic (auto: bfloat16 where the CPU computes it natively)")
    p.add_argument("--overrides", default="{}", help='JSON {"method": {setting: value}}, e.g. \'{"dds3d": {"t0": 0.2}}\'; '
                   '"n_samples" there gives that method its own sample count')
    p.add_argument("--max-memory-gib", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the tables and the JSON line; return the JSON dict."""
    a = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        return _run(a)
    finally:
        torch.set_num_threads(threads)


def _run(a: argparse.Namespace) -> dict[str, Any]:
    from medrecon import reconstruct
    from medrecon.operators import ParallelBeamCT
    from medrecon.training.runtime import cpu_model

    methods = [m for m in a.methods.split(",") if m]
    unknown = sorted(set(methods) - {"tv3d", *SLICEWISE, *VOLUME_METHODS})
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; known: tv3d, dds, ccdf, dds3d, mbir3d")
    overrides = json.loads(a.overrides)
    vol = volume_slices(read_volume(a.volume), a.size, a.slices)
    prior, prior_note = None, ""
    if any(m != "tv3d" for m in methods):
        from medrecon.priors import ScorePrior

        prior = ScorePrior.load(a.prior)
        prior.precision = a.precision
        prior_note = f"{prior.name or a.prior} ({prior.card.get('training', {}).get('steps', '?')} training steps)"
    rows: list[dict[str, Any]] = []
    common = {"size": a.size, "slices": a.slices, "samples": a.samples}
    for views in (int(v) for v in a.views.split(",")):
        A = ParallelBeamCT.sparse_view(a.size, views)  # noqa: N806
        y = A(vol)
        rows.append({"views": views, "method": "fbp", **common, "samples": 0, **metrics(reconstruct(y, A, method="fbp").mean, vol),
                     "seconds": 0.0})
        for m in methods:
            torch.manual_seed(a.seed)
            t0 = time.perf_counter()
            if m == "tv3d":
                rec = reconstruct(y, A, method="tv", axes=("z", "y", "x"))
            else:
                kw = dict(overrides.get(m, {}))
                n_samples = int(kw.pop("n_samples", a.samples))  # a method's own sample count
                rec = reconstruct(y, A, method=m, prior=prior, n_samples=n_samples, seed=a.seed,
                                  max_memory=a.max_memory_gib * 2**30, **kw)
            seconds = time.perf_counter() - t0
            info = rec.info
            row = {"views": views, "method": m, **common, **metrics(rec.mean, vol, rec.std),
                   "seconds": round(seconds, 1), "peak_rss_gib": round(_peak_rss_gib(), 2), "nfe": info.get("nfe", 0),
                   "settings": info.get("settings", {}), "tuned": info.get("tuned"),
                   "std_scale": info.get("std_scale"), "warnings": info.get("warnings", [])}
            row["samples"] = 0 if m == "tv3d" else n_samples
            rows.append(row)
    cpu = cpu_model()
    print(f"3-D CT benchmark: {a.volume}, {a.slices} slices × {a.size}², {a.samples} sample(s); prior {prior_note or '-'}; "
          f"{cpu}, {a.threads} thread(s), precision {a.precision}")
    head = (f"{'views':>5} {'method':<7} {'smp':>3} {'PSNR dB':>8} {'SSIM':>6} {'z-err':>7} {'z-err HU':>8} {'cover':>6} "
            f"{'s':>7} {'NFE':>5} {'RSS GiB':>7}  tuned")
    print(head)
    print("-" * len(head))
    for r in rows:
        cov = f"{r['coverage_2sigma']:6.3f}" if "coverage_2sigma" in r else f"{'':>6}"
        print(f"{r['views']:5d} {r['method']:<7} {r['samples']:3d} {r['psnr']:8.2f} {r['ssim']:6.3f} {r['z_coherence']:7.4f} "
              f"{r['z_coherence_hu']:8.1f} {cov} {r['seconds']:7.1f} {r.get('nfe', 0):5d} "
              f"{r.get('peak_rss_gib', 0.0):7.2f}  {r.get('tuned') or '-'}")
    targets = _check_targets(rows)
    for t in targets:
        mark = {True: "met", False: "MISSED", None: "not measured"}[t["ok"]]
        print(f"target: {t['target']}: {mark}")
    result = {"bench": "mbir3d", "device": "cpu", "cpu": cpu, "threads": a.threads, "precision": a.precision,
              "volume": a.volume, **common, "views": a.views, "prior": prior_note, "overrides": overrides,
              "results": rows, "targets": targets}
    print(json.dumps(result, default=str), flush=True)
    return result


if __name__ == "__main__":
    main()
