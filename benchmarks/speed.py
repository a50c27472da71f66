"""What speeds up the prior's network on this CPU: a table of variants, then one JSON line.

The network is the cost of every diffusion method (DDS: 4 posterior samples × ~30 evaluations of
the "S" U-Net at 256²).  For each variant this measures the median wall time of one network
evaluation on a batch of ``--batch`` images (after warm-up) and its accuracy against the
default (float32, eager): the largest and the relative RMS difference of the Tweedie estimate
x̂₀ at σ ≈ 0.06 (the DDS start), in normalised units, and the PSNR between the two estimates.

Variants: float32 eager in the default and channels-last layouts; 1 vs 2 threads; bfloat16
autocast (oneDNN uses AVX512-BF16 / AMX where the CPU has them); ``torch.compile`` (inductor, C++
codegen with gcc) in float32 and bfloat16; ONNX Runtime when ``onnxruntime`` is importable.
``--recon`` adds the end-to-end row the DDS target is about: 4 posterior samples of one 256²
slice (``ct/val.npz`` row 7, a tuning row) at 23 views with ``medrecon.reconstruct(method="dds")``,
its wall time and PSNR, per precision.

``--batches 1,2,4,8,16`` measures instead the time per image of the prior's own gradient-free
evaluation (``ScorePrior.score``: its precision, channels-last) at each batch size: the volume
methods pass a volume's slices through the network in chunks of the fastest one
(``medrecon.solvers.presets.NET_FASTEST_PIXELS``).

    python benchmarks/speed.py --batch 4 --repeats 5 --recon
    python benchmarks/speed.py --batches 1,2,4,8,16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrecon.priors import ScorePrior

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prior", default="ct-256")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--t", type=float, default=0.2, help="diffusion time of the test input")
    p.add_argument("--skip", default="", help="semicolon-separated variant names to skip")
    p.add_argument("--recon", action="store_true", help="add the end-to-end DDS rows")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes: time per image of each (only)")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="--batches: the prior's precision (auto: bfloat16 where the CPU computes it natively)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="--batches: pick the fastest by wall time, or by process CPU time (a host shared with "
                        "other jobs; set OMP_WAIT_POLICY=PASSIVE so that waiting threads do not count)")
    return p.parse_args(argv)


def batch_sweep(prior: ScorePrior, x: torch.Tensor, t: float, batches: list[int], repeats: int) -> list[dict[str, Any]]:
    """Seconds per image of ``prior.score`` (no gradients) at each batch size, on copies of ``x``.

    The batch sizes take turns within each repeat (after one warm-up round), so that a load
    that comes and goes on a shared host weighs on all of them alike; the median per size is
    kept.
    """
    inputs = {b: (x.repeat(math.ceil(b / x.shape[0]), 1, 1, 1)[:b].contiguous(), torch.full((b,), t))
              for b in batches}
    times: dict[int, list[float]] = {b: [] for b in batches}
    cpu: dict[int, list[float]] = {b: [] for b in batches}
    with torch.no_grad():
        for r in range(repeats + 1):
            for b in batches:
                t0, c0 = time.perf_counter(), time.process_time()
                prior.score(*inputs[b])
                if r:  # the first round warms up
                    times[b].append(time.perf_counter() - t0)
                    cpu[b].append(time.process_time() - c0)
    rows = []
    for b in batches:
        sec, csec = statistics.median(times[b]), statistics.median(cpu[b])
        rows.append({"batch": b, "s_per_eval": round(sec, 4), "s_per_image": round(sec / b, 4),
                     "cpu_s_per_image": round(csec / b, 4)})
        print(f"batch {b:4d}: {sec:8.3f} s per evaluation, {sec / b:7.4f} s per image, "
              f"{csec / b:7.4f} CPU-s per image", flush=True)
    return rows


def _median_time(f: Callable[[], Any], repeats: int) -> float:
    f()
    f()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _variants(prior: ScorePrior) -> dict[str, Callable[[], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]]:
    """name -> builder of a function (x, t) -> network output F(x, t) (float32 out)."""
    net = prior.net

    def variant(layout=torch.channels_last, threads=2, dtype=None, compiled=False):
        def build():
            torch.set_num_threads(threads)
            net.to(memory_format=layout)
            run = torch.compile(net, dynamic=False) if compiled else net

            def f(x, t):
                if dtype is None:
                    return run(x, t)
                with torch.autocast("cpu", dtype=dtype):
                    return run(x, t).float()

            return f

        return build

    def onnx():
        import onnxruntime as ort  # noqa: F401  (optional)

        def build():
            import io

            torch.set_num_threads(2)
            net.to(memory_format=torch.contiguous_format)
            x = torch.rand(1, 1, 64, 64)
            t = torch.full((1,), 0.2)
            buf = io.BytesIO()
            torch.onnx.export(net, (x, t), buf, input_names=["x", "t"], output_names=["f"],
                              dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "t": {0: "b"}})
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 2
            sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])

            def f(x, t):
                out = sess.run(None, {"x": x.numpy(), "t": t.numpy()})[0]
                return torch.from_numpy(out)

            return f

        return build

    out = {
        "fp32 eager (contiguous)": variant(torch.contiguous_format),
        "fp32 eager (channels-last)": variant(),
        "fp32 eager, 1 thread": variant(threads=1),
        "bf16 autocast (default)": variant(dtype=torch.bfloat16),
        "fp32 torch.compile": variant(compiled=True),
        "bf16 torch.compile": variant(dtype=torch.bfloat16, compiled=True),
    }
    try:
        out["onnxruntime fp32"] = onnx()
    except ImportError:
        pass
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure, print the table and the JSON line; return the JSON dict."""
    args = parse_args(argv)
    torch.manual_seed(0)
    prior = ScorePrior.load(args.prior)
    prior.eval()
    sde = prior.sde
    gen = torch.Generator().manual_seed(0)
    data = os.environ.get("MEDRECON_DATA", str(REPO.parent / "shared" / "data"))
    val = Path(data) / "ct" / "val.npz"
    if val.is_file():  # real images (tuning rows) when the data is there
        hu = np.load(val)["images"][[7, 24, 7, 24][: args.batch]].astype(np.float32)
        x0 = torch.from_numpy((np.clip(hu, -1024, 3071) + 1024) / 4096)[:, None]
        x0 = torch.nn.functional.interpolate(x0, size=args.size) if args.size != 256 else x0
        if x0.shape[0] < args.batch:
            x0 = x0.repeat(math.ceil(args.batch / x0.shape[0]), 1, 1, 1)[: args.batch]
    else:
        x0 = torch.rand(args.batch, 1, args.size, args.size, generator=gen)
    t = torch.full((args.batch,), args.t)
    sigma = float(sde.std(t[:1].double())[0])
    xt = x0 + sigma * torch.randn(x0.shape, generator=gen)
    if args.batches:
        from medrecon.training.runtime import cpu_model

        torch.set_num_threads(2)
        prior.precision = args.precision
        print(f"# batch sweep: {cpu_model()}, 2 threads, precision {args.precision} "
              f"({'bfloat16' if prior._autocast_dtype(xt, False) else 'float32'} here)")
        sweep = batch_sweep(prior, xt, args.t, [int(b) for b in args.batches.split(",")], args.repeats)
        clock = "cpu_s_per_image" if args.clock == "cpu" else "s_per_image"
        best = min(sweep, key=lambda r: r[clock])
        print(f"fastest per image ({args.clock} time): batch {best['batch']} ({best[clock]:.4f} s per "
              f"{args.size}² image)")
        out = {"bench": "speed", "mode": "batches", "prior": args.prior, "size": args.size, "threads": 2,
               "cpu": cpu_model(), "precision": args.precision, "torch": torch.__version__, "rows": sweep,
               "clock": args.clock, "fastest_batch": best["batch"], "fastest_pixels": best["batch"] * args.size**2}
        print(json.dumps(out), flush=True)
        return out
    rows = []
    ref = None
    skip = {s.strip() for s in args.skip.split(";") if s.strip()}
    print(f"# speed: prior {args.prior}, batch {args.batch} × {args.size}², t {args.t} (σ {sigma:.3f}), "
          f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs")
    for name, build in _variants(prior).items():
        if name in skip:
            continue
        try:
            t_build = time.perf_counter()
            f = build()
            with torch.no_grad():
                f(xt, t)
                build_s = time.perf_counter() - t_build
                sec = _median_time(lambda f=f: f(xt, t), args.repeats)
                out = f(xt, t).float()
        except Exception as err:  # noqa: BLE001  (a variant that does not run is a row, not a crash)
            rows.append({"variant": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"})
            print(f"{name:38s} failed: {rows[-1]['error']}", flush=True)
            continue
        x0_hat = xt + sigma * out  # Tweedie for VE: x + σ² · F/σ
        if ref is None:
            ref, ref_sec = x0_hat, sec
        d = (x0_hat - ref).double()
        mse = float((d**2).mean())
        row = {
            "variant": name,
            "s_per_eval": round(sec, 4),
            "s_per_image": round(sec / args.batch, 4),
            "speedup": round(ref_sec / sec, 2),
            "first_call_s": round(build_s, 1),
            "x0_max_abs_diff": float(f"{float(d.abs().max()):.3g}"),
            "x0_rel_rms_diff": float(f"{math.sqrt(mse) / float(ref.double().pow(2).mean().sqrt()):.3g}"),
            "x0_psnr_vs_fp32": round(10 * math.log10(1 / mse), 1) if mse > 0 else None,
        }
        rows.append(row)
        print(f"{name:38s} {sec:7.3f} s/eval  {row['s_per_image']:6.3f} s/image  ×{row['speedup']:.2f}  "
              f"first call {build_s:5.1f} s  x̂₀ max |Δ| {row['x0_max_abs_diff']:.2e}  "
              f"PSNR vs fp32 {row['x0_psnr_vs_fp32']}", flush=True)
    torch.set_num_threads(2)
    prior.net.to(memory_format=torch.contiguous_format)
    prior._layout = torch.contiguous_format
    recon_rows = _recon_rows(prior) if args.recon and val.is_file() else []
    out = {"bench": "speed", "prior": args.prior, "batch": args.batch, "size": args.size,
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "torch": torch.__version__, "rows": rows, "recon": recon_rows}
    print(json.dumps(out), flush=True)
    return out


def _recon_rows(prior: ScorePrior) -> list[dict[str, Any]]:
    from medrecon import reconstruct
    from medrecon.operators import ParallelBeamCT

    hu = torch.from_numpy(np.load(Path(os.environ.get("MEDRECON_DATA", str(REPO.parent / "shared" / "data")))
                                  / "ct" / "val.npz")["images"][[7]].astype(np.float32))[:, None]
    A = ParallelBeamCT.sparse_view(256, 23)  # noqa: N806
    y = A(hu)
    ref = (hu.clamp(-1024, 3071) + 1024) / 4096
    rows = []
    for precision in ("float32", "bfloat16"):
        prior.precision = precision
        t0 = time.perf_counter()
        rec = reconstruct(y, A, method="dds", prior=prior, n_samples=4, seed=0)
        wall = time.perf_counter() - t0
        x = (rec.mean.clamp(-1024, 3071) + 1024) / 4096
        p = 10 * math.log10(1 / float(((x - ref) ** 2).mean()))
        rows.append({"precision": precision, "wall_s": round(wall, 1), "psnr": round(p, 2), "nfe": rec.info["nfe"],
                     "settings": {k: rec.info["settings"][k] for k in ("steps", "t0", "eta", "dc_iters")}})
        rows[-1]["target_20s"] = wall <= 20
        print(f"dds, 4 samples, 23 views, {precision:8s}: {wall:6.1f} s wall (target ≤ 20 s: "
              f"{'met' if wall <= 20 else 'NOT met'}), PSNR {p:.2f} dB, NFE {rec.info['nfe']}", flush=True)
    prior.precision = "float32"
    return rows


if __name__ == "__main__":
    main()
