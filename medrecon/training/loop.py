"""The training loop: denoising score matching with checkpoints that resume exactly.

* Loss: ``E_t E_z || F(x0 + std(t) z, t) + z ||^2`` — DSM with weighting ``std(t)^2``
  (Song et al. 2021), ``t ~ U(eps, 1)`` (or ``t_dist="focused"``, :func:`sample_t`).
* Optimiser AdamW with linear warm-up, gradient clipping, EMA of the weights.
* Checkpoints (``torch.save`` dicts, our own files, outside git) every
  ``checkpoint_every_s`` seconds and on SIGTERM/SIGINT into ``out_dir``: ``last.pt`` plus kept
  snapshots.  Resuming restores model, optimiser, EMA, both RNGs and the data position, so a
  resumed run takes exactly the step an uninterrupted one would.
* Logs: ``loss.csv`` (step, wall time, loss, lr, grad norm), ``val.csv`` and
  ``samples_<step>.png`` (:mod:`medrecon.training.validation`), a tqdm bar.
* ``init_from`` starts from shipped weights (model and EMA); the optimiser is re-initialised
  because shipped priors do not carry it.
* Multi-GPU: launched by ``torchrun`` (``WORLD_SIZE > 1``) it wraps the net in DDP (NCCL on
  GPUs, gloo on CPUs); each rank draws its own batches of ``batch_size`` (the effective batch is
  ``world × batch_size``), rank 0 writes files.  Checkpoints hold every rank's data position and
  noise RNG, so a resume with the same number of processes is exact; another number resumes the
  weights and optimiser with fresh streams.  Stopping (signal, ``max_time_s``) and clock-driven
  checkpoints are agreed by all ranks, so no rank is left waiting in an all-reduce.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medrecon.errors import InputError, SettingsError
from medrecon.priors.networks import ScoreNet, widen_for_coords
from medrecon.priors.prior import ScorePrior, native_bf16, sigma_to_t
from medrecon.priors.sde import SDE
from medrecon.training.campaign import campaign_history
from medrecon.training.config import T_DISTS, TrainConfig, cfg_from_dict
from medrecon.training.data import _make_sampler, load_slices, load_training_data
from medrecon.training.runtime import _agree, _ddp, _Stop, runtime_info
from medrecon.training.validation import (
    _log_val,
    _preview,
    read_val_log,
    validate,
    validation_curve,
    validation_plateau,
)

__all__ = ["CKPT_FORMAT", "train", "learning_rate", "sample_t", "train_autocast", "dsm_loss", "load_checkpoint", "load_ema_net"]

CKPT_FORMAT = "medrecon-train-ckpt-1"


def sample_t(
    sde: SDE,
    n: int,
    gen: torch.Generator,
    device: torch.device | str = "cpu",
    dist: str = "uniform",
    focus_sigma: float = 0.5,
    high_share: float = 0.25,
) -> Tensor:
    """``n`` training diffusion times: uniform in ``[eps, 1]`` (``dist="uniform"``), or
    ``"focused"``: each draw is uniform with probability ``high_share`` and otherwise uniform in
    ``[eps, t(focus_sigma)]`` (log-uniform noise levels for the VE SDE).  Two uniforms are
    drawn per item in either case, so the random stream does not depend on ``dist``."""
    u = torch.rand(2, n, generator=gen, device=device)
    t = sde.eps + (1.0 - sde.eps) * u[0]
    if dist == "focused":
        t_hi = float(sigma_to_t(sde, focus_sigma))
        low = sde.eps + (t_hi - sde.eps) * u[0]
        t = torch.where(u[1] < high_share, t, low)
    elif dist != "uniform":
        raise SettingsError(f"sample_t: dist must be one of {', '.join(T_DISTS)}; got {dist!r}")
    return t


def train_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 when a training step with this ``precision`` should autocast to it, else None
    (float32): ``"auto"`` asks whether the CPU computes bfloat16 natively."""
    if precision == "bfloat16" or (precision == "auto" and device.type == "cpu" and native_bf16()):
        return torch.bfloat16
    return None


def dsm_loss(
    net: torch.nn.Module,
    sde: SDE,
    x0: Tensor,
    gen: torch.Generator,
    coords: Tensor | None = None,
    t: Tensor | None = None,
    cast: torch.dtype | None = None,
) -> Tensor:
    """Denoising score-matching loss ``mean || F(x_t, t) + z ||^2`` (weighting ``std^2``);
    ``coords`` (position-aware nets) are passed to the net with the noisy patches; ``t``
    (default: uniform, :func:`sample_t`) the diffusion times; ``cast`` (bfloat16) autocasts
    the network, the loss is summed in float32."""
    if t is None:
        t = sample_t(sde, x0.shape[0], gen, x0.device)
    t = t.to(x0.dtype)
    xt, z, _ = sde.perturb(x0, t, generator=gen)
    with torch.autocast(x0.device.type, dtype=cast or torch.bfloat16, enabled=cast is not None):
        out = net(xt, t) if coords is None else net(xt, t, coords)
    return ((out.float() + z) ** 2).mean()


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint (``weights_only`` loading: no arbitrary unpickling)."""
    path = Path(path)
    try:
        from torch.torch_version import TorchVersion

        with torch.serialization.safe_globals([TorchVersion]):  # early checkpoints stored it
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
        raise InputError(path, f"not a readable training checkpoint ({err})") from err
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise InputError(
            path, f"not a medrecon training checkpoint (expected format {CKPT_FORMAT})"
        )
    return ck


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary dict.

    Parameters
    ----------
    config : TrainConfig

    Returns
    -------
    dict
        ``step``, ``wall_s``, ``last_loss``, ``out_dir``, ``checkpoint``, ``stopped_by``,
        ``runtime`` (:func:`~medrecon.training.runtime.runtime_info`).

    Raises
    ------
    SettingsError
        Resuming with settings that differ from the checkpoint's.
    InputError
        Unreadable data or checkpoint.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    runtime = runtime_info()
    rank, world = _ddp()
    if rank == 0 and runtime["device"] == "cpu" and runtime["threads"] > 1 and not runtime["tcmalloc"]:
        print(f"train: {runtime['threads']} threads without tcmalloc: on a shared 2-core host "
              "preload it (LD_PRELOAD=.../libtcmalloc_minimal.so.4) and set "
              "OMP_WAIT_POLICY=PASSIVE (docs/priors.md)", file=sys.stderr)
    device = torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    )
    out = config.output_dir()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    sde = config.build_sde()
    with torch.random.fork_rng(devices=[]):  # seeded initialisation; global RNG untouched
        torch.manual_seed(config.seed)
        net = ScoreNet(config.network_spec(), sde, config.sigma_data).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    images, boxes, owner = load_training_data(config.data, config.modality)
    sampler = _make_sampler(config, images, boxes, owner, config.seed * 1000 + rank)
    noise_gen = torch.Generator(device=device).manual_seed(config.seed * 1000 + 500 + rank)
    step, wall = 0, 0.0
    earlier = {"steps": 0, "wall_time_s": 0.0}  # training the init_from weights had already had
    ckpath = out / "last.pt"
    resumed: dict[str, Any] = {}  # the settings of the checkpoint this run continues
    if config.resume and ckpath.exists():
        ck = load_checkpoint(ckpath)
        resumed = ck["config"]
        old = TrainConfig(**cfg_from_dict(ck["config"]))  # fields added since: defaults
        diff = [k for k in TrainConfig.ARCH_FIELDS if getattr(old, k) != getattr(config, k)]
        if diff:
            raise SettingsError(
                f"train: {ckpath} was made with other settings ({', '.join(diff)}); "
                "use another run name/out_dir or resume=False"
            )
        net.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        step, wall = int(ck["step"]), float(ck["wall_s"])
        earlier = dict(ck.get("earlier", earlier))
        ranks = ck.get("rank_states") or [{"sampler": ck["sampler"], "noise_rng": ck["noise_rng"]}]
        restream = [k for k in TrainConfig.STREAM_FIELDS
                    if tuple(getattr(old, k) or ()) != tuple(getattr(config, k) or ())]
        if restream:  # the data changed: what the earlier steps were trained on stays on record
            earlier["data_history"] = [*earlier.get("data_history", []), {
                "until_step": int(earlier.get("steps", 0)) + step,
                "data": list(old.data), "data_weights": list(old.data_weights or []),
            }]
        if len(ranks) == world and not restream:  # exact resume: every rank continues its own data and noise
            sampler.load_state_dict(ranks[rank]["sampler"])
            noise_gen.set_state(ranks[rank]["noise_rng"])
        else:  # another number of processes or other data: fresh, distinct streams from the step on
            sampler = _make_sampler(config, images, boxes, owner,
                                    config.seed * 1000 + rank + 7919 * step)
            noise_gen.manual_seed(config.seed * 1000 + 500 + rank + 7919 * step)
            if rank == 0:
                why = (f"its {' and '.join(restream)} differ from this run's" if restream
                       else f"it was written by {len(ranks)} process(es), this run has {world}")
                print(f"train: {ckpath}: {why}: resuming the weights and optimiser with new data/noise "
                      "streams (not bit-exact)", file=sys.stderr)
        _truncate_log(out / "loss.csv", step)
        _truncate_log(out / "val.csv", step)
    elif config.init_from:
        init = ScorePrior.load(config.init_from)
        widen = net.spec.coords and not init.net.spec.coords
        base = replace(net.spec, coords=False) if widen else net.spec
        if init.net.spec != base or init.sde.to_dict() != sde.to_dict():
            raise SettingsError(f"train: init_from {config.init_from} has another architecture/SDE")
        state = init.net.unet.state_dict()
        # a position-aware net may start from weights without coordinates: the coordinate
        # channels get zero input weights, so it starts as exactly the net it came from
        net.unet.load_state_dict(widen_for_coords(state) if widen else state)
        ema.load_state_dict(net.state_dict())
        # shipped weights carry no optimiser state: AdamW starts fresh (warm-up again)
        before = init.card.get("training", {})
        history = campaign_history(init.card)
        earlier = {
            "steps": int(before.get("steps", 0)),
            "wall_time_s": float(before.get("wall_time_s", 0.0)),
            # compute and validation of the stages before (the card's campaign curve)
            "cpu_hours": history[-1]["cumulative_cpu_hours"] if history else 0.0,
            "campaign": history,
            "data_history": list(before.get("data_history", [])),
            # the validation curve of those steps, which the exported card's curve continues
            "validation_rows": [
                r for r in init.card.get("validation", {}).get("during_training", {}).get("rows", [])
                if r.get("step", 0) <= int(before.get("steps", 0))
            ],
        }
        before_data = before.get("config", {}).get("data")
        if before_data and tuple(before_data) != tuple(config.data):
            earlier["data_history"].append({
                "until_step": earlier["steps"], "data": list(before_data),
                "data_weights": list(before.get("config", {}).get("data_weights") or []),
            })
    if config.lr_decay_steps and config.lr_decay_from is None:
        # a cooldown starts where this invocation starts, unless it resumes one already under way
        started = resumed.get("lr_decay_from") if resumed.get("lr_decay_steps") == config.lr_decay_steps else None
        config = replace(config, lr_decay_from=int(started) if started is not None else step)
    end_step = config.max_steps  # a cooldown ends the run when it is over
    if config.lr_decay_steps and config.lr_decay_from is not None:
        end_step = min(end_step, config.lr_decay_from + config.lr_decay_steps)
    model: torch.nn.Module = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net)
    if config.compile:
        model = torch.compile(model)
    cast = train_autocast(config.precision, device)
    runtime["precision"] = "bfloat16" if cast is not None else "float32"
    runtime["compile"] = bool(config.compile)
    val_images = (
        load_slices([config.val_data], config.modality)[: config.val_slices]
        if config.val_data
        else None
    )

    def checkpoint(keep: bool = False) -> Path:
        # collective under DDP: every rank's data position and noise RNG go into the file
        mine = {"sampler": sampler.state_dict(), "noise_rng": noise_gen.get_state()}
        ranks = [mine]
        if world > 1:
            ranks = [None] * world
            torch.distributed.all_gather_object(ranks, mine)
        state = {
            "format": CKPT_FORMAT,
            "config": {**asdict(config), "data": list(config.data)},
            "step": step,
            "wall_s": wall,
            "model": net.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "sampler": sampler.state_dict(),
            "noise_rng": noise_gen.get_state(),
            "rank_states": ranks,
            "earlier": earlier,
            "runtime": runtime,
            "torch_version": str(torch.__version__),
        }
        if rank == 0:
            _atomic_save(state, ckpath)
            if keep:
                _atomic_save(state, out / f"step_{step:07d}.pt")
        return ckpath

    bar = None
    if config.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(
            total=end_step,
            initial=step,
            mininterval=30,
            desc=config.run,
            file=sys.stderr,
            dynamic_ncols=False,
        )
    log_f = open(out / "loss.csv", "a", newline="") if rank == 0 else None
    writer = csv.writer(log_f) if log_f else None
    if log_f and log_f.tell() == 0 and writer:
        writer.writerow(["step", "wall_s", "loss", "lr", "grad_norm"])
    t_start = time.monotonic()
    t_last_ck = t_last_val = t_last_sample = t_start
    acc_loss, acc_n, gnorm = 0.0, 0, 0.0
    stopped_by, last_loss = "cooldown" if end_step < config.max_steps else "max_steps", float("nan")
    plateau = False  # set on rank 0 by a validation, agreed by all ranks at the next step
    try:
        with _Stop() as stop:
            t_prev = time.monotonic()
            while step < end_step:
                net.train()
                c0 = None
                if config.coords:
                    x0, c0 = sampler.next_batch_coords()
                    x0, c0 = x0.to(device), c0.to(device)
                else:
                    x0 = sampler.next_batch().to(device)
                lr = learning_rate(config, step)
                for g in opt.param_groups:
                    g["lr"] = lr
                t = sample_t(sde, x0.shape[0], noise_gen, device, config.t_dist,
                             config.focus_sigma, config.high_share)
                loss = dsm_loss(model, sde, x0, noise_gen, coords=c0, t=t, cast=cast)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip))
                opt.step()
                decay = min(config.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for pe, pn in zip(ema.parameters(), net.parameters(), strict=True):
                        pe.lerp_(pn, 1.0 - decay)
                    for be, bn in zip(ema.buffers(), net.buffers(), strict=True):
                        be.copy_(bn)
                step += 1
                now = time.monotonic()
                wall += now - t_prev  # whole-loop wall time (validation and previews included)
                t_prev = now
                last_loss = float(loss.detach())
                acc_loss += last_loss
                acc_n += 1
                if bar:
                    bar.update(1)
                if writer and (step % config.log_every == 0 or step == end_step):
                    writer.writerow(
                        [
                            step,
                            f"{wall:.1f}",
                            f"{acc_loss / acc_n:.5f}",
                            f"{lr:.3g}",
                            f"{gnorm:.3f}",
                        ]
                    )
                    assert log_f is not None
                    log_f.flush()
                    if bar:
                        bar.set_postfix(loss=f"{acc_loss / acc_n:.4f}")
                    acc_loss, acc_n = 0.0, 0
                keep = bool(config.snapshot_every_steps) and step % config.snapshot_every_steps == 0
                # decisions taken on the clock or a signal are agreed by all ranks (DDP): a rank
                # that stopped or checkpointed alone would leave the others waiting forever
                timed_out = config.max_time_s is not None and now - t_start >= config.max_time_s
                ck_due, stop_now, plateau_agreed = _agree(
                    world, now - t_last_ck >= config.checkpoint_every_s, stop.flag or timed_out, plateau
                )
                if keep or ck_due:
                    checkpoint(keep)
                    t_last_ck = now
                if (
                    rank == 0
                    and val_images is not None
                    and config.validate_every_s
                    and now - t_last_val >= config.validate_every_s
                ):
                    _log_val(out / "val.csv", step, wall, validate(ema, val_images))
                    t_last_val = time.monotonic()
                    # the whole curve: the init_from card's validations, then this run's
                    plateau = bool(config.patience) and validation_plateau(
                        validation_curve(earlier, read_val_log(out / "val.csv")),
                        config.patience,
                        config.min_delta_db,
                    )
                if (
                    rank == 0
                    and config.sample_every_s
                    and now - t_last_sample >= config.sample_every_s
                ):
                    _preview(ema, config, out / f"samples_{step:07d}.png")
                    t_last_sample = time.monotonic()
                if stop_now:
                    stopped_by = "max_time" if timed_out else "signal"
                    break
                if plateau_agreed:  # the agreed flag: every rank leaves at the same step
                    stopped_by = "plateau"
                    break
            checkpoint(keep=False)
    finally:
        if bar:
            bar.close()
        if log_f:
            log_f.close()
    return {
        "step": step,
        "wall_s": wall,
        "last_loss": last_loss,
        "out_dir": str(out),
        "checkpoint": str(ckpath),
        "stopped_by": stopped_by,
        "runtime": runtime,
    }


def learning_rate(config: TrainConfig, step: int) -> float:
    """AdamW's learning rate at run step ``step``: a linear warm-up to ``config.lr`` over the
    first ``warmup_steps``, then constant, or, from ``lr_decay_from`` on, a half cosine down to
    ``lr_final`` over ``lr_decay_steps`` (a cooldown; ``lr_final`` after it)."""
    lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
    start = config.lr_decay_from
    if config.lr_decay_steps and start is not None and step >= start:
        done = min(1.0, (step - start) / config.lr_decay_steps)
        lr = config.lr_final + 0.5 * (lr - config.lr_final) * (1.0 + math.cos(math.pi * done))
    return lr


def _truncate_log(path: Path, step: int) -> None:
    """Drop loss-log lines written after the checkpoint we resume from."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = [ln for ln in lines if not ln[:1].isdigit() or int(ln.split(",")[0]) <= step]
    path.write_text("\n".join(keep) + ("\n" if keep else ""))


def load_ema_net(checkpoint: str | Path) -> tuple[ScoreNet, TrainConfig, dict[str, Any]]:
    """The EMA network of a trainer checkpoint, with the run's settings and the checkpoint dict."""
    ck = load_checkpoint(checkpoint)
    cfg = TrainConfig(**cfg_from_dict(ck["config"]))
    net = ScoreNet(cfg.network_spec(), cfg.build_sde(), cfg.sigma_data)
    net.load_state_dict(ck["ema"])
    return net, cfg, ck
