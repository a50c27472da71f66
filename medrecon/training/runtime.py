"""The process a training run lives in: threads, tcmalloc, CPU, DDP ranks and stop signals.

* :func:`runtime_info` and :func:`cpu_model` record how the process computes (intra-op threads,
  whether tcmalloc is preloaded, ``OMP_WAIT_POLICY``, device, CPU); the record goes into the
  checkpoint, the run's summary and the exported card.
* Multi-GPU: launched by ``torchrun`` (``WORLD_SIZE > 1``) the trainer joins a process group
  (NCCL on GPUs, gloo on CPUs); decisions taken on the clock or on a signal (stop, checkpoint)
  are OR-ed over all ranks (:func:`_agree`), so no rank is left waiting in an all-reduce.
* SIGTERM/SIGINT set a flag (:class:`_Stop`): the loop finishes its step, checkpoints and
  returns.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import torch

__all__ = ["cpu_model", "runtime_info"]


def cpu_model() -> str:
    """The CPU's model name and whether it computes bfloat16 natively (for timing records)."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for ln in f:
                key, _, value = ln.partition(":")
                info.setdefault(key.strip(), value.strip())
                if "model name" in info and "flags" in info:
                    break
    flags = info.get("flags", "").split()
    isa = "AVX512-BF16" if "avx512_bf16" in flags else ("AVX2" if "avx2" in flags else "")
    return f"{info.get('model name') or 'unknown CPU'} ({isa or 'no AVX2'}, {os.cpu_count()} cores)"


def runtime_info() -> dict[str, Any]:
    """How this process computes: intra-op threads, whether tcmalloc is preloaded (it is
    mapped into the process), ``OMP_WAIT_POLICY``, device — for comparing thread settings
    (one run at 2 threads with tcmalloc against two runs at 1 thread)."""
    tcmalloc = False
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as f:
            tcmalloc = any("tcmalloc" in line for line in f)
    return {
        "threads": torch.get_num_threads(),
        "tcmalloc": tcmalloc,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu": cpu_model(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


class _Stop:
    """SIGTERM/SIGINT → finish the step, checkpoint, exit."""

    def __init__(self) -> None:
        self.flag = False
        self.old: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.flag = True

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def _agree(world: int, *flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over all ranks (one tiny all-reduce under DDP)."""
    if world == 1:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([float(f) for f in flags])
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def _ddp() -> tuple[int, int]:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return (torch.distributed.get_rank() if ws > 1 else 0), ws
