"""Benchmark the CT and MRI forward operators against scikit-image, ASTRA, deepinv and SigPy.

In one process, with ``torch.set_num_threads(2)``, a fixed seed, one warm-up call and the median
of repeated calls (``torch.cuda.synchronize()`` around each call on CUDA):

* ``ParallelBeamCT`` at 256² with 23 and 180 views, batch 1 and 8: the forward projection A
  against ``skimage.transform.radon`` (always), ASTRA's CPU ``linear`` projector and deepinv's
  ``Tomography`` (when installed); the adjoint Aᵀ against ASTRA / deepinv back-projection and,
  since scikit-image has no exact adjoint, against ``iradon(filter_name=None)`` (an unfiltered
  back-projection, which costs the same kind of work); FBP against ``iradon`` (ramp).
  scikit-image and ASTRA take one image per call, so their batch 8 is 8 calls in a loop (warmed
  up by the batch-1 case); deepinv takes the batch.  Our timings exclude the one-off
  system-matrix build, which has its own rows (a build with the disk cache off, full mode only,
  and the first use, normally a load from the disk cache).
* ``MultiCoilMRI`` (SENSE, complex64, 8 coils, 256², batch 1) forward and adjoint against
  ``sigpy.mri.linop.Sense`` and ``deepinv.physics.MultiCoilMRI``.
* Accuracy: the adjoint identity |<Ax, y> - <x, Aᵀy>| / (‖Ax‖ ‖y‖) in float64 (23 views), and
  the relative error of A against ``radon`` on the Shepp-Logan phantom.

A speed-up is the reference's time divided by ours for the same work.  The headline keys
(``radon23_vs_skimage`` ...) are batch 1, the harder case for us: our batch 8 costs little more
than batch 1, the loops of the references cost 8 times as much.

Prints a table, then (last) one JSON line.  Targets: 23 views >= 15x scikit-image and >= 3x
ASTRA-CPU; 180 views >= 20x scikit-image.  Timings on a shared host are noisy: compare ratios
taken in one run.

    python benchmarks/operators.py            # full (a few minutes on 2 cores)
    python benchmarks/operators.py --quick    # < 60 s: fewer repeats, fewer cases
    python benchmarks/operators.py --smoke    # 64², 1 repeat, no optional peers (the test)
    python benchmarks/operators.py --clinical # 512², 720 views × 560 bins: time and peak memory

Clinical size (``--clinical``; ``--clinical-size 128`` shrinks it for a smoke run).  A fan-beam
geometry like the Helsinki Tomography Challenge's (flat detector, 560 bins of 0.2 mm, 720 views
over 2π, source–origin 410.66 mm, source–detector 553.74 mm, 512² pixels of 0.16 mm) and a
parallel-beam one (720 views over π, 560 bins), both far above the 2 GiB matrix budget, so
medrecon runs matrix-free.  Each measurement runs in a fresh process, which reports its wall
time (median of the repeats after one warm-up call) and its peak resident memory (the process's
own, interpreter and libraries included, and the part the operation added).  Peers: ASTRA's CPU
``line_fanflat`` / ``line`` projectors (FP, BP; FBP for parallel beam only: ASTRA's CPU FBP has
no fan beam) and scikit-image ``radon`` / ``iradon`` (parallel beam only).  Targets on 2 cores:
FBP ≤ 10 s and ≤ 2 GiB peak, A and Aᵀ ≤ 2 s each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

SEED = 0
VIEWS = (23, 180)
BATCHES = (1, 8)
COILS = 8

#: clinical-size targets: seconds (wall, 2 threads) and GiB of peak resident memory
CLINICAL_TARGETS = {"fan_fbp_s": 10.0, "fan_fbp_peak_gib": 2.0, "fan_A_s": 2.0, "fan_AT_s": 2.0,
                    "parallel_fbp_s": 10.0, "parallel_A_s": 2.0, "parallel_AT_s": 2.0}

TARGETS = {
    "radon23_vs_skimage": 15.0,
    "radon23_vs_astra": 3.0,
    "radon180_vs_skimage": 20.0,
}


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reps:
    """Up to ``most`` timed calls, at least ``least``; stop once they took ``budget_s`` in all."""

    most: int
    least: int
    budget_s: float


@dataclass(frozen=True)
class Plan:
    """What a mode (full, ``--quick``, ``--smoke``) runs, and how often."""

    size: int
    cases: tuple[tuple[int, int], ...]  # (views, batch)
    fbp_cases: tuple[tuple[int, int], ...]
    ours: Reps
    ref: Reps
    peers: bool
    cold_build: bool  # also time a build with the disk cache off


ALL_CASES = tuple((v, b) for v in VIEWS for b in BATCHES)


def plan_for(args: argparse.Namespace) -> Plan:
    """The plan of the chosen mode."""
    peers = not args.no_peers
    short = tuple(c for c in ALL_CASES if c != (180, 8))  # the slowest references left out
    fbp_short = ((VIEWS[0], 1),)
    if args.smoke:
        return Plan(64, short, fbp_short, Reps(1, 1, 0), Reps(1, 1, 0), False, False)
    if args.quick:
        return Plan(256, short, fbp_short, Reps(7, 2, 0.3), Reps(3, 1, 0.3), peers, False)
    return Plan(256, ALL_CASES, ALL_CASES, Reps(25, 7, 1.0), Reps(7, 5, 2.0), peers, True)


def make_sync(device: torch.device) -> Callable[[], None]:
    """``torch.cuda.synchronize`` on a CUDA device, else a no-op."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure(
    fn: Callable[[], object], reps: Reps, sync: Callable[[], None], *, warmup: bool = True
) -> tuple[float, int]:
    """Median wall time of ``fn()`` in ms after one warm-up call; returns ``(ms, repeats)``."""

    def once() -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    if warmup:
        once()
    times: list[float] = []
    while len(times) < reps.most and (len(times) < reps.least or sum(times) < reps.budget_s):
        times.append(once())
    return 1e3 * statistics.median(times), len(times)


# --------------------------------------------------------------------------------------------
# optional peers
# --------------------------------------------------------------------------------------------
def import_deepinv() -> tuple[types.ModuleType | None, str]:
    """Import deepinv behind the torchvision stub (ENVIRONMENT.md §2); any failure -> None."""
    try:
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules.setdefault(name, types.ModuleType(name))
        import deepinv

        return deepinv, str(getattr(deepinv, "__version__", "?"))
    except Exception as err:  # noqa: BLE001 - the broken torchvision raises RuntimeError
        return None, f"not installed ({type(err).__name__}: {str(err)[:80]})"


def import_astra() -> tuple[types.ModuleType | None, str]:
    """Import astra-toolbox; any failure (missing CUDA runtime wheels ...) -> None."""
    try:
        import astra

        return astra, str(getattr(astra, "__version__", "?"))
    except Exception as err:  # noqa: BLE001
        return None, f"not installed ({type(err).__name__}: {str(err)[:80]})"


def relerr(a: np.ndarray, b: np.ndarray) -> float:
    """‖a − b‖ / ‖b‖."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def shepp_logan(n: int) -> np.ndarray:
    """The scikit-image Shepp-Logan phantom resized to n × n, float32."""
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    return resize(shepp_logan_phantom(), (n, n), anti_aliasing=True).astype(np.float32)


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------
class Bench:
    """Collects table rows and summary keys."""

    def __init__(self, plan: Plan, device: torch.device):
        self.plan = plan
        self.device = device
        self.sync = make_sync(device)
        self.rows: list[dict] = []
        self.summary: dict = {}

    def ours(self, fn: Callable[[], object]) -> tuple[float, int]:
        """Time one of our operators (CUDA-synchronised)."""
        return measure(fn, self.plan.ours, self.sync)

    def ref(self, fn: Callable[[], object], warmup: bool = True) -> tuple[float, int]:
        """Time a reference (deepinv runs on our device, so it is synchronised too)."""
        return measure(fn, self.plan.ref, self.sync, warmup=warmup)

    def compare(
        self,
        op: str,
        case: str,
        ours: tuple[float, int],
        ref: str,
        ref_t: tuple[float, int] | None,
        note: str = "",
    ) -> float | None:
        """Add a row; return the speed-up (reference ms / our ms)."""
        speedup = None if ref_t is None else ref_t[0] / ours[0]
        self.rows.append(
            {
                "op": op,
                "case": case,
                "ours_ms": round(ours[0], 4),
                "ours_reps": ours[1],
                "ref": ref,
                "ref_ms": None if ref_t is None else round(ref_t[0], 4),
                "ref_reps": None if ref_t is None else ref_t[1],
                "speedup": None if speedup is None else round(speedup, 3),
                "note": note,
            }
        )
        return speedup

    def info(self, op: str, case: str, value: float, unit: str, note: str = "") -> None:
        """Add a row that is a single measurement (build time, error)."""
        self.rows.append({"op": op, "case": case, "value": value, "unit": unit, "note": note})


def build_operator(bench: Bench, n: int, views: int):
    """Make the operator and materialise its torch CSR pair, timing both build paths."""
    from medrecon.operators import ParallelBeamCT
    from medrecon.operators.sparse import cache_dir

    dev, case = bench.device, f"{views}v {n}²"
    if bench.plan.cold_build:
        old = os.environ.get("MEDRECON_CACHE")
        os.environ["MEDRECON_CACHE"] = "off"
        try:
            t0 = time.perf_counter()
            cold = ParallelBeamCT.sparse_view(n, views)
            cold.matrix.get(dev, torch.float32)
            cold.matrix.get(dev, torch.float32, transpose=True)
            bench.sync()
            bench.info(
                "system matrix build (no cache) + torch CSR",
                case,
                round(time.perf_counter() - t0, 3),
                "s",
            )
            del cold
        finally:
            if old is None:
                del os.environ["MEDRECON_CACHE"]
            else:
                os.environ["MEDRECON_CACHE"] = old
    folder = cache_dir()
    before = set(folder.glob("*.npz")) if folder is not None and folder.exists() else set()
    t0 = time.perf_counter()
    op = ParallelBeamCT.sparse_view(n, views)
    m = op.matrix
    m.get(dev, torch.float32)
    m.get(dev, torch.float32, transpose=True)
    bench.sync()
    dt = time.perf_counter() - t0
    after = set(folder.glob("*.npz")) if folder is not None and folder.exists() else set()
    how = (
        "disk cache off"
        if folder is None
        else ("cache miss: built and written" if after - before else "loaded from disk cache")
    )
    bench.info(
        "system matrix first use + torch CSR",
        case,
        round(dt, 3),
        "s",
        f"{how}; nnz {m.matrix.nnz:,}",
    )
    return op


@dataclass
class CTRefs:
    """The references for one angle set: scikit-image angles, and the peers' operators."""

    theta_deg: np.ndarray
    astra_op: object | None  # astra.OpTomo
    dinv_op: object | None  # deepinv.physics.Tomography


def ct_refs(op, dinv, astra, device: torch.device) -> CTRefs:
    """Set up ASTRA (CPU ``linear``) and deepinv for ``op``'s angles and detector."""
    n = op.image_shape[0]
    astra_op = dinv_op = None
    if astra is not None:
        pg = astra.create_proj_geom("parallel", 1.0, op.n_bins, op.angles)
        vg = astra.create_vol_geom(n, n)
        astra_op = astra.OpTomo(astra.create_projector("linear", pg, vg))
    if dinv is not None:
        dinv_op = dinv.physics.Tomography(
            angles=torch.tensor(np.rad2deg(op.angles), dtype=torch.float32),  # degrees
            img_width=n,
            circle=False,
            device=device,
            normalize=False,
        )
    return CTRefs(np.rad2deg(op.angles), astra_op, dinv_op)


def bench_ct_case(bench: Bench, op, refs: CTRefs, views: int, b: int, x: torch.Tensor) -> None:
    """A, Aᵀ and FBP rows of one (views, batch) case."""
    from skimage.transform import iradon, radon

    n, s, case = op.image_shape[0], bench.summary, f"{views}v b{b}"
    theta, aop, dop = refs.theta_deg, refs.astra_op, refs.dinv_op
    y = op(x)
    imgs = list(x[:, 0].cpu().numpy())
    sinos = list(y[:, 0].cpu().numpy())  # (views, bins) each
    warm = b == 1  # a loop over batch-1 calls was already warmed up by the batch-1 case
    yd = None if dop is None else dop.A(x)  # (B, 1, bins, views)

    def key(what: str, ref: str) -> str:  # radon23_b1_vs_x, radon23_b1_adjoint_vs_x, fbp23_b1_vs_x
        if what == "adj":
            return f"radon{views}_b{b}_adjoint_vs_{ref}"
        return f"{what}{views}_b{b}_vs_{ref}"

    # forward A
    t = bench.ours(lambda: op(x))
    s[key("radon", "skimage")] = bench.compare(
        "A (radon)",
        case,
        t,
        "skimage radon",
        bench.ref(lambda: [radon(im, theta, circle=False) for im in imgs], warm),
    )
    if aop is not None:
        s[key("radon", "astra")] = bench.compare(
            "A (radon)",
            case,
            t,
            "ASTRA-CPU linear",
            bench.ref(lambda: [aop.FP(im) for im in imgs], warm),
        )
    if dop is not None:
        s[key("radon", "deepinv")] = bench.compare(
            "A (radon)", case, t, "deepinv Tomography", bench.ref(lambda: dop.A(x))
        )

    # adjoint Aᵀ
    t = bench.ours(lambda: op.adjoint(y))
    s[key("adj", "skimage_bp")] = bench.compare(
        "Aᵀ (back-projection)",
        case,
        t,
        "skimage iradon filter=None",
        bench.ref(
            lambda: [
                iradon(q.T, theta, output_size=n, filter_name=None, circle=False) for q in sinos
            ],
            warm,
        ),
        "unfiltered back-projection, not the exact adjoint",
    )
    if aop is not None:
        s[key("adj", "astra")] = bench.compare(
            "Aᵀ (back-projection)",
            case,
            t,
            "ASTRA-CPU linear",
            bench.ref(lambda: [aop.BP(q) for q in sinos], warm),
        )
    if dop is not None:
        s[key("adj", "deepinv")] = bench.compare(
            "Aᵀ (back-projection)",
            case,
            t,
            "deepinv Tomography",
            bench.ref(lambda: dop.A_adjoint(yd)),
            "A_adjoint, adjoint_via_backprop (default)",
        )

    # FBP (ramp)
    if (views, b) not in bench.plan.fbp_cases:
        return
    t = bench.ours(lambda: op.fbp(y))
    s[key("fbp", "skimage")] = bench.compare(
        "FBP (ramp)",
        case,
        t,
        "skimage iradon",
        bench.ref(
            lambda: [
                iradon(q.T, theta, output_size=n, filter_name="ramp", circle=False) for q in sinos
            ],
            warm,
        ),
    )
    if aop is not None and b == 1:
        s[key("fbp", "astra")] = bench.compare(
            "FBP (ramp)",
            case,
            t,
            "ASTRA-CPU FBP",
            bench.ref(lambda: [aop.reconstruct("FBP", q) for q in sinos]),
        )
    if dop is not None and b == 1:
        s[key("fbp", "deepinv")] = bench.compare(
            "FBP (ramp)", case, t, "deepinv Tomography.fbp", bench.ref(lambda: dop.fbp(yd))
        )


def ct_accuracy(bench: Bench, op, refs: CTRefs, views: int) -> None:
    """Relative error of A against the references on the Shepp-Logan phantom."""
    from skimage.transform import radon

    n, dev = op.image_shape[0], bench.device
    ph = shepp_logan(n)
    ours = op(torch.from_numpy(ph)[None, None].to(dev))[0, 0].cpu().numpy()
    err = relerr(ours, radon(ph, refs.theta_deg, circle=False).T)
    bench.summary[f"radon{views}_vs_skimage_relerr"] = err
    bench.info(
        "A vs skimage radon, rel. error",
        f"{views}v phantom",
        err,
        "",
        "Shepp-Logan; same discretisation",
    )
    if refs.astra_op is not None:
        bench.info(
            "A vs ASTRA linear, rel. error",
            f"{views}v phantom",
            relerr(refs.astra_op.FP(ph), ours),
            "",
            "another discretisation (Joseph)",
        )
    if refs.dinv_op is not None:
        d = refs.dinv_op.A(torch.from_numpy(ph)[None, None].to(dev))[0, 0].cpu().numpy().T
        bench.info("A vs deepinv Tomography, rel. error", f"{views}v phantom", relerr(d, ours), "")


def bench_ct(bench: Bench, dinv, astra) -> None:
    """All CT rows, and the headline keys."""
    n, dev, s = bench.plan.size, bench.device, bench.summary
    gen = torch.Generator().manual_seed(SEED)
    for views in VIEWS:
        op = build_operator(bench, n, views)
        refs = ct_refs(op, dinv, astra, dev)
        for b in BATCHES:
            x = torch.rand(b, 1, n, n, generator=gen).to(dev)  # drawn in every mode: same data
            if (views, b) in bench.plan.cases:
                bench_ct_case(bench, op, refs, views, b, x)
        ct_accuracy(bench, op, refs, views)
        if views == VIEWS[0]:
            s["radon_adjoint_relerr"] = adjoint_relerr(op, n, dev)
            bench.info(
                "adjoint identity |<Ax,y>-<x,Aᵀy>|/(‖Ax‖‖y‖)",
                f"{views}v float64",
                s["radon_adjoint_relerr"],
                "",
            )
        del op, refs
    s["radon_vs_skimage_relerr"] = max(s[f"radon{v}_vs_skimage_relerr"] for v in VIEWS)
    for v in VIEWS:
        for peer in ("skimage", "astra", "deepinv"):
            if s.get(f"radon{v}_b1_vs_{peer}") is not None:
                s[f"radon{v}_vs_{peer}"] = s[f"radon{v}_b1_vs_{peer}"]


def adjoint_relerr(op, n: int, dev: torch.device) -> float:
    """|<Ax, y> − <x, Aᵀy>| / (‖Ax‖ ‖y‖) for random x, y in float64."""
    g = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(1, 1, n, n, generator=g, dtype=torch.float64).to(dev)
    y = torch.randn(1, 1, len(op.angles), op.n_bins, generator=g, dtype=torch.float64).to(dev)
    ax = op(x)
    lhs = float((ax * y).sum())
    rhs = float((x * op.adjoint(y)).sum())
    return abs(lhs - rhs) / float(ax.norm() * y.norm())


def bench_sense(bench: Bench, dinv) -> None:
    """SENSE rows: forward and adjoint against SigPy and deepinv."""
    import sigpy.mri

    from medrecon.operators import MultiCoilMRI, mri_mask

    n, dev, s = bench.plan.size, bench.device, bench.summary
    maps_np = sigpy.mri.birdcage_maps((COILS, n, n)).astype(np.complex64)
    mask = mri_mask("equispaced", (n, n), acceleration=4)
    mask_np = mask.numpy().astype(np.float32)
    op = MultiCoilMRI(torch.from_numpy(maps_np), mask)
    g = torch.Generator().manual_seed(SEED + 2)
    x = torch.randn(1, 1, n, n, generator=g, dtype=torch.complex64).to(dev)
    y = op(x)
    case = f"{COILS} coils {n}² b1"

    sense = sigpy.mri.linop.Sense(maps_np, weights=mask_np)
    xs, ys = x[0, 0].cpu().numpy(), y[0].cpu().numpy()
    t_fwd = bench.ours(lambda: op(x))
    t_adj = bench.ours(lambda: op.adjoint(y))
    s["sense_vs_sigpy"] = bench.compare(
        "SENSE A", case, t_fwd, "sigpy Sense", bench.ref(lambda: sense(xs))
    )
    s["sense_adjoint_vs_sigpy"] = bench.compare(
        "SENSE Aᴴ", case, t_adj, "sigpy Sense.H", bench.ref(lambda: sense.H(ys))
    )
    bench.info("SENSE A vs sigpy, rel. error", case, relerr(y[0].cpu().numpy(), sense(xs)), "")
    if dinv is not None and hasattr(dinv.physics, "MultiCoilMRI"):
        phys = dinv.physics.MultiCoilMRI(
            mask=torch.from_numpy(mask_np).to(dev),
            coil_maps=torch.from_numpy(maps_np).to(dev),
            img_size=(n, n),
            device=dev,
        )
        xd = torch.view_as_real(x[:, 0]).permute(0, 3, 1, 2).contiguous()  # (B, 2, H, W)
        yd = phys.A(xd)  # (B, 2, coils, H, W)
        s["sense_vs_deepinv"] = bench.compare(
            "SENSE A", case, t_fwd, "deepinv MultiCoilMRI", bench.ref(lambda: phys.A(xd))
        )
        s["sense_adjoint_vs_deepinv"] = bench.compare(
            "SENSE Aᴴ", case, t_adj, "deepinv MultiCoilMRI", bench.ref(lambda: phys.A_adjoint(yd))
        )
        yc = torch.complex(yd[:, 0], yd[:, 1])
        bench.info(
            "SENSE A vs deepinv, rel. error", case, relerr(yc.cpu().numpy(), y.cpu().numpy()), ""
        )


# --------------------------------------------------------------------------------------------
# clinical size: one measurement per process (its own peak memory)
# --------------------------------------------------------------------------------------------
#: (geometry, who, operation) of every clinical-size measurement
CLINICAL_CASES = [(g, who, op) for g in ("fan", "parallel") for who, op in
                  [("medrecon", "A"), ("medrecon", "AT"), ("medrecon", "fbp"), ("astra", "A"), ("astra", "AT"),
                   ("astra", "fbp"), ("skimage", "A"), ("skimage", "AT"), ("skimage", "fbp")]
                  if not (g == "fan" and (who == "skimage" or (who, op) == ("astra", "fbp")))]


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rss_mib() -> float:
    """Current resident memory of this process (MiB), from /proc (0 where unknown)."""
    try:
        for line in open("/proc/self/status", encoding="utf-8"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def clinical_geometry(kind: str, n: int) -> dict:
    """The clinical-size geometry (scaled to an n² grid for smoke runs)."""
    views, bins = (720, 560) if n >= 512 else (max(16, 720 * n // 512), max(16, 560 * n // 512))
    if kind == "fan":
        return {"type": "fan", "convention": "astra", "detector": "flat", "n_detectors": bins,
                "detector_spacing_mm": 0.2 * 560 / bins, "source_to_isocenter_mm": 410.66,
                "source_to_detector_mm": 553.74, "pixel_size_mm": 0.16 * 512 / n,
                "angles_rad": (np.arange(views) * 2 * np.pi / views).tolist()}
    return {"type": "parallel", "convention": "astra", "n_detectors": bins, "detector_spacing_mm": 1.0,
            "angles_rad": (np.arange(views) * np.pi / views).tolist()}


def clinical_one(kind: str, who: str, op: str, n: int, reps: int) -> dict:
    """Time one operation at clinical size in this (fresh) process; its peak memory."""
    import resource

    g = clinical_geometry(kind, n)
    x = shepp_logan(n)
    base = _rss_mib()
    if who == "medrecon":
        from medrecon.datasets.simulate import ct_operator

        A = ct_operator(g, (n, n))
        xt = torch.from_numpy(x)[None, None]
        with torch.no_grad():
            y = A(xt)
        fn = {"A": lambda: A(xt), "AT": lambda: A.adjoint(y), "fbp": lambda: A.fbp(y)}[op]
        note = "matrix-free" if A.matrix_free else "sparse matrix"
    elif who == "astra":
        import astra

        pix = g.get("pixel_size_mm", 1.0)
        vol = astra.create_vol_geom(n, n, -n * pix / 2, n * pix / 2, -n * pix / 2, n * pix / 2)
        a = np.asarray(g["angles_rad"])
        if kind == "fan":
            geom = astra.create_proj_geom("fanflat", g["detector_spacing_mm"], g["n_detectors"], a,
                                          g["source_to_isocenter_mm"],
                                          g["source_to_detector_mm"] - g["source_to_isocenter_mm"])
        else:
            geom = astra.create_proj_geom("parallel", g["detector_spacing_mm"], g["n_detectors"], a)
        W = astra.OpTomo(astra.create_projector("line_fanflat" if kind == "fan" else "line", geom, vol))  # noqa: N806
        y = W.FP(x)
        fn = {"A": lambda: W.FP(x), "AT": lambda: W.BP(y), "fbp": lambda: W.reconstruct("FBP", y)}[op]
        note = f"astra-toolbox {astra.__version__} CPU (cuda: {astra.use_cuda()})"
    else:
        import skimage
        from skimage.transform import iradon, radon

        theta = np.rad2deg(np.asarray(g["angles_rad"]))
        sino = radon(x, theta, circle=False)
        fn = {"A": lambda: radon(x, theta, circle=False),
              "AT": lambda: iradon(sino, theta, circle=False, filter_name=None),
              "fbp": lambda: iradon(sino, theta, circle=False)}[op]
        note = f"scikit-image {skimage.__version__}" + (" (unfiltered iradon as Aᵀ)" if op == "AT" else "")
    ready = _rss_mib()
    fn()  # warm-up (medrecon: plans its chunks)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"geometry": kind, "who": who, "op": op, "s": round(statistics.median(times), 4), "reps": reps,
            "peak_mib": round(peak), "added_mib": round(peak - ready), "base_mib": round(base), "note": note}


def bench_clinical(n: int, threads: int, reps: int, peers: bool) -> tuple[list[dict], dict]:
    """Every clinical-size case in a fresh process each; rows and the summary keys."""
    import subprocess

    from medrecon.operators.ct import projector_memory_bytes

    rows, summary = [], {}
    for kind, who, op in CLINICAL_CASES:
        if who != "medrecon" and not peers:
            continue
        if who == "astra" and import_astra()[0] is None:
            rows.append({"geometry": kind, "who": who, "op": op, "s": None, "note": "astra-toolbox not installed"})
            continue
        cmd = [sys.executable, __file__, "--clinical-one", f"{kind},{who},{op}", "--clinical-size", str(n),
               "--threads", str(threads), "--reps", str(reps)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"geometry": kind, "who": who, "op": op, "s": None, "note": f"failed: {tail[:120]}"})
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        if who == "medrecon":
            summary[f"{kind}_{op}_s"] = row["s"]
            summary[f"{kind}_{op}_peak_gib"] = round(row["peak_mib"] / 1024, 3)
    g = clinical_geometry("fan", n)
    summary["matrix_gib_would_be"] = round(projector_memory_bytes((n, n), len(g["angles_rad"]), g["n_detectors"])
                                           / 2**30, 1)
    return rows, summary


def format_clinical(rows: Sequence[dict]) -> str:
    """The clinical-size table."""
    head = f"{'geometry':<9} {'operation':<6} {'implementation':<10} {'wall s':>8} {'peak MiB':>9} {'added MiB':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        t = "–" if r.get("s") is None else f"{r['s']:.3f}"
        lines.append(f"{r['geometry']:<9} {r['op']:<6} {r['who']:<10} {t:>8} {r.get('peak_mib', '–'):>9} "
                     f"{r.get('added_mib', '–'):>10}  ({r['note']})")
    return "\n".join(lines)


def main_clinical(args: argparse.Namespace) -> dict:
    """``--clinical``: the clinical-size table and JSON line."""
    n = args.clinical_size
    t0 = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()]
    rows, s = bench_clinical(n, args.threads, args.reps, not args.no_peers)
    targets = {f"{k} <= {v:g}": s[k] <= v for k, v in CLINICAL_TARGETS.items() if s.get(k) is not None}
    load = [round(v, 2) for v in os.getloadavg()]
    print(f"medrecon operator benchmark (clinical): {n}², CPU {cpu_name()}, {args.threads} threads, "
          f"torch {torch.__version__}; load average {load_start[0]} at the start, {load[0]} at the end on "
          f"{os.cpu_count()} cores")
    print(f"as sparse matrices this fan-beam geometry would need about {s['matrix_gib_would_be']} GiB to build\n")
    print(format_clinical(rows))
    print("\ntargets: " + ", ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in targets.items()))
    out = {"bench": "operators-clinical", "device": "cpu", "cpu": cpu_name(), "threads": args.threads,
           "size": n, "results": rows, **s, "targets": targets, "wall_s": round(time.perf_counter() - t0, 1),
           "loadavg_start": load_start, "loadavg_end": load, "cpu_count": os.cpu_count()}
    print(json.dumps(out))
    return out


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def format_table(rows: Sequence[dict]) -> str:
    """The human-readable table: timing comparisons, then single measurements."""
    head = f"{'operation':<22} {'case':<20} {'ours ms':>9} {'reference':<27} {'ref ms':>9} {'speed-up':>9} {'reps':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "ours_ms" in r:
            reps = f"{r['ours_reps']}/{r['ref_reps']}" if r["ref_reps"] else str(r["ours_reps"])
            lines.append(
                f"{r['op']:<22} {r['case']:<20} {r['ours_ms']:>9.3f} {r['ref']:<27} "
                f"{_fmt(r['ref_ms'], '9.2f'):>9} {_fmt(r['speedup'], '8.1f') + 'x':>9} {reps:>6}"
                + (f"  ({r['note']})" if r["note"] else "")
            )
    lines += ["", f"{'measurement':<48} {'case':<20} {'value':>12}", "-" * 82]
    for r in rows:
        if "value" in r:
            v = r["value"]
            val = f"{v:.3g}" if r["unit"] == "" else f"{v:.3f} {r['unit']}"
            lines.append(
                f"{r['op']:<48} {r['case']:<20} {val:>12}"
                + (f"  ({r['note']})" if r["note"] else "")
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="fewer repeats of slow references (< 60 s)"
    )
    mode.add_argument(
        "--smoke", action="store_true", help="64² images, 1 repeat, no optional peers"
    )
    mode.add_argument("--clinical", action="store_true",
                      help="512², 720 views × 560 bins: time and peak memory, each in a fresh process")
    mode.add_argument("--clinical-one", metavar="GEOMETRY,WHO,OP", help=argparse.SUPPRESS)
    ap.add_argument("--clinical-size", type=int, default=512, help="grid of --clinical (512; smaller for a try)")
    ap.add_argument("--reps", type=int, default=3, help="--clinical: timed repeats after a warm-up (3)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peers", action="store_true", help="skip deepinv and ASTRA")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print the table and the JSON line; return the JSON object."""
    args = parse_args(argv)
    if args.clinical_one:
        torch.set_num_threads(args.threads)
        out = clinical_one(*args.clinical_one.split(","), args.clinical_size, args.reps)
        print(json.dumps(out))
        return out
    if args.clinical:
        threads_before = torch.get_num_threads()
        try:
            return main_clinical(args)
        finally:
            torch.set_num_threads(threads_before)
    plan = plan_for(args)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    t_start = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import scipy
            import sigpy
            import skimage

            dinv, dinv_v = import_deepinv() if plan.peers else (None, "skipped")
            astra, astra_v = import_astra() if plan.peers else (None, "skipped")
            bench = Bench(plan, torch.device(args.device))
            bench_ct(bench, dinv, astra)
            bench_sense(bench, dinv)
    finally:
        torch.set_num_threads(threads_before)
    wall = time.perf_counter() - t_start

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    load = [round(v, 2) for v in os.getloadavg()]
    print(
        f"medrecon operator benchmark ({mode}): {plan.size}², device {args.device}, "
        f"{args.threads} threads, torch {torch.__version__}, {platform.machine()}"
    )
    if load[0] > (os.cpu_count() or 1):
        print(
            f"WARNING: load average {load[0]} at the end on {os.cpu_count()} cores: the host is "
            "busy, multi-threaded timings (ours, deepinv) suffer more than single-threaded ones"
        )
    if (180, 8) not in plan.cases:
        print(f"{mode}: the 180-view batch-8 case, and FBP except at 23 views batch 1, left out")
    print(
        f"peers: scikit-image {skimage.__version__}, sigpy {sigpy.__version__}, scipy "
        f"{scipy.__version__}, deepinv {dinv_v}, astra-toolbox {astra_v}"
    )
    print(
        "speed-up = reference ms / ours ms for the same work; references at batch 8 loop "
        "over 8 images (deepinv takes the batch)\n"
    )
    print(format_table(bench.rows))
    s = bench.summary
    targets = {f"{k} >= {v:g}": (s[k] >= v) for k, v in TARGETS.items() if s.get(k) is not None}
    print(
        "\ntargets: "
        + ", ".join(
            f"{k}: {'met' if ok else 'MISSED'} ({s[k.split()[0]]:.1f}x)"
            for k, ok in targets.items()
        )
    )
    print(f"wall time {wall:.1f} s")
    out = {
        "bench": "operators",
        "device": args.device,
        "threads": args.threads,
        "quick": bool(args.quick),
        "smoke": bool(args.smoke),
        "size": plan.size,
        "peers": {
            "deepinv": dinv_v,
            "astra": astra_v,
            "skimage": skimage.__version__,
            "sigpy": sigpy.__version__,
            "torch": torch.__version__,
        },
        "results": bench.rows,
        **{k: v for k, v in s.items() if v is not None},
        "targets": targets,
        "wall_s": round(wall, 2),
        "loadavg_start": load_start,
        "loadavg_end": load,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
