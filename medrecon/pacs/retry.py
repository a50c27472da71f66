"""Bounded retries with exponential backoff for transient PACS failures.

Only failures a later attempt can cure are retried: connection errors, timeouts, HTTP 5xx / 408 /
429, DIMSE associations that could not be opened or were aborted.  Authentication failures and
other refusals fail at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from medrecon.errors import SettingsError

__all__ = ["RetryPolicy", "Transient", "call_with_retries"]

log = logging.getLogger("medrecon.pacs")
T = TypeVar("T")


class Transient(Exception):
    """Raised by a client step to ask for another attempt; ``str()`` says what went wrong."""


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all, waiting ``base_delay_s * 2**k`` (at most ``max_delay_s``) between them."""

    attempts: int = 4
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay_s < 0 or self.max_delay_s < 0:
            raise SettingsError(
                f"retry policy needs attempts >= 1 and non-negative delays; got {self.attempts}, "
                f"{self.base_delay_s}, {self.max_delay_s}"
            )

    def delay(self, attempt: int) -> float:
        return min(self.max_delay_s, self.base_delay_s * (2**attempt))


def call_with_retries(
    fn: Callable[[], T], policy: RetryPolicy, what: str, on_give_up: Callable[[str], Exception],
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it returns, raises a non-:class:`Transient` error or attempts run out.

    ``what`` names the request for the log (it must hold no secret or patient data); after the last
    attempt ``on_give_up(reason)`` builds the error to raise.
    """
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Transient as err:
            reason = str(err)
            if attempt + 1 >= policy.attempts:
                raise on_give_up(f"{reason} (gave up after {policy.attempts} attempts)") from None
            wait = policy.delay(attempt)
            log.warning("%s: %s; retrying in %.1f s (attempt %d of %d)", what, reason, wait,
                        attempt + 2, policy.attempts)
            sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover
