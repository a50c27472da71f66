"""The training campaign of a prior: validation against cumulative compute.

A shipped prior is trained in stages, one per session (issue 32: no GPU, so the priors
accumulate CPU-hours).  Each export appends a point to the card's ``training.campaign``:
cumulative steps and CPU-hours (wall time × threads), the CPU and recipe of the stage, and the
Tweedie validation of the exported weights; a stage continued from a card (``init_from``)
carries that card's points forward.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["campaign_history", "campaign_point"]


def campaign_history(card: dict[str, Any]) -> list[dict[str, Any]]:
    """The training campaign of a card: one point per exported stage (cumulative steps and
    CPU-hours, the CPU, the recipe and the validation), the curve of validation against
    compute that continued training extends.  A card from before the record gets one point
    from its totals (its wall time counted as one thread, as most of those runs used; the point
    says so)."""
    training = card.get("training", {})
    if "campaign" in training:
        return [dict(p) for p in training["campaign"]]
    if not training.get("steps"):
        return []
    threads = int(training.get("runtime", {}).get("threads") or 1)
    wall_h = float(training.get("wall_time_s", 0.0)) / 3600
    return [{
        "stage": f"{card.get('name', 'prior')} before the campaign record",
        "cumulative_steps": int(training["steps"]),
        "cumulative_cpu_hours": round(wall_h, 2),
        "note": f"{wall_h:.2f} h of wall time counted as one thread: the thread counts of the stages "
        f"before the record were not kept per stage (the last one ran on {threads})",
        "precision": training.get("runtime", {}).get("precision", "float32"),
        "tweedie_psnr_db": card.get("validation", {}).get("tweedie_psnr_db"),
        "validation": f"{card.get('validation', {}).get('data')}, {card.get('validation', {}).get('slices')} slices",
    }]


def campaign_point(earlier: dict[str, Any], ck: dict[str, Any]) -> dict[str, Any]:
    """This checkpoint's point of the campaign: its steps and CPU-hours (wall time × threads)
    on top of the ``earlier`` training it continued, with the CPU and the recipe it ran."""
    runtime = ck.get("runtime", {})
    threads = int(runtime.get("threads") or 1)
    before_h = earlier.get("cpu_hours", float(earlier.get("wall_time_s", 0.0)) / 3600)
    run_h = float(ck["wall_s"]) * threads / 3600
    cfg = ck["config"]
    point = {
        "stage": f"{cfg.get('run')} to step {ck['step']}",
        "date": time.strftime("%Y-%m-%d"),
        "cumulative_steps": int(earlier.get("steps", 0)) + int(ck["step"]),
        "cumulative_cpu_hours": round(before_h + run_h, 2),
        "run_steps": int(ck["step"]),
        "run_cpu_hours": round(run_h, 2),
        "cpu": runtime.get("cpu", "not recorded"),
        "threads": threads,
        "precision": runtime.get("precision", cfg.get("precision", "float32")),
        "t_dist": cfg.get("t_dist", "uniform"),
        "lr": cfg.get("lr"),
    }
    if cfg.get("lr_decay_steps"):  # a cooled branch: where its cooldown started and how far it went
        point["cooldown"] = {
            "from_run_step": cfg.get("lr_decay_from"),
            "steps": int(cfg["lr_decay_steps"]),
            "lr_final": cfg.get("lr_final"),
            "done_steps": max(0, int(ck["step"]) - int(cfg.get("lr_decay_from") or 0)),
        }
    return point
