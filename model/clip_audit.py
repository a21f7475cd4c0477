"""Online dense audits of a clip model's stream (VideoMAE with Run-Length Tokenization), and its fidelity floor.

A clip stream's compute follows its content: RLT drops the tubelets whose change is below tau (model/rlt.py), so
there is no compute ratio to choose. What the stream is served can still be measured and held to a floor:
  - audits: on clips drawn at random, once the stream's audit share of its own compute (the MACs of the clips it
    was served) holds a dense clip, the plain model (tau 0: every tubelet) classifies the same window after the
    served answer went out; the two are compared as a classifier's answers (model/fidelity.py: top-1 agreement and
    logit rel-L2). The audits give the stream's fidelity estimate with its interval (`estimate()`);
  - the floor (`min_top1_agreement`, `max_rel_l2`): the stream's own tau walks a ladder of rungs, the server's tau
    halved at each (tau, tau/2, tau/4, tau/8), then 0, where every tubelet is kept and the answer is the plain
    model's. Audits at the current rung that miss the floor (their mean, after `audits_to_lower`) move the stream
    a rung down (more tubelets kept, more compute); audits that meet it with room (the interval's far end, after
    `audits_to_raise`) move it a rung back up, to try the cheaper tau again. A rung up that misses again doubles
    the audits the next try waits for (up to 16x), so a stream next to its floor's edge spends most of its time
    on the rung that holds it. At tau 0 the served answer is the dense one, so a floor always holds there: the
    floor costs compute, never fidelity.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from model.fidelity import MAX_AUDITS, LogitFidelity, audit_estimate


@dataclass(frozen=True)
class ClipAuditConfig:
    audit_share: float = 0.02  # of the stream's compute (the MACs of its served clips) spent on audits
    rungs: int = 4  # taus tried before 0: the server's tau halved rungs - 1 times
    audits_to_lower: int = 3  # audits at a rung before its mean can move the stream a rung down
    audits_to_raise: int = 8  # audits at a rung before its interval can move the stream a rung up (doubles, to
    # 16x, each time a rung up misses)
    audit_probability: float = 0.25  # each due clip's chance of its audit once the share holds a dense clip
    confidence: float = 0.9
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.audit_share <= 0.5:
            raise ValueError(f"audit_share must be in [0, 0.5], got {self.audit_share}")


class ClipAudits:
    """One clip stream's audits, fidelity estimate and tau. Per clip served: `will_audit()` (drawn before the step,
    so the server can defer the clip's bookkeeping to idle time), then `after_clip(served, macs, dense_fn)`."""

    fidelity = LogitFidelity()

    def __init__(self, tau: float, dense_macs: int, config: ClipAuditConfig | None = None,
                 max_error: float | None = None, min_agreement: float | None = None):
        if not tau >= 0:
            raise ValueError(f"tau must be >= 0, got {tau!r}")
        self.config = config or ClipAuditConfig()
        self.dense_macs = dense_macs
        # the ladder: the server's tau halved at each rung, then 0 (a server at tau 0 has the one rung)
        self.taus = [tau / 2**k for k in range(self.config.rungs)] + [0.0] if tau > 0 else [0.0]
        self.rung = 0
        self.max_error, self.min_agreement = max_error, min_agreement
        self.rng = random.Random(self.config.seed)
        self.served_macs = 0  # of every clip served
        self.measured = 0  # MACs of the audits
        self.clips = 0
        self.audits = 0  # audits run, all of them
        self.errors: deque[float] = deque(maxlen=MAX_AUDITS)  # per audit, the latest: what the estimate rests on
        self.agreements: deque[float] = deque(maxlen=MAX_AUDITS)
        self.rung_errors: deque[float] = deque(maxlen=MAX_AUDITS)  # per audit at the current rung: the floor's
        self.rung_agreements: deque[float] = deque(maxlen=MAX_AUDITS)
        self.floor_missed = False  # the current rung's audits miss the floor (until it moves)
        self.raise_after = self.config.audits_to_raise  # audits that meet the floor before trying a rung up
        self._raised = False  # the current rung was reached by a rung up (a miss there backs off the next try)
        self._draw = False

    @property
    def tau(self) -> float:
        return self.taus[self.rung]

    def _credit(self) -> float:
        return self.config.audit_share * self.served_macs - self.measured

    def will_audit(self) -> bool:
        """Drawn before the step: whether this frame's clip (if one is due) is audited after it is served."""
        self._draw = self._credit() >= self.dense_macs and self.rng.random() < self.config.audit_probability
        return self._draw

    def skip_audit(self) -> None:
        """The drawn audit does not run (no time for it before a due frame): the credit stays for a later clip."""
        self._draw = False

    def after_clip(self, served: Any, macs: int, dense_fn: Callable[[], Any]) -> int:
        """A clip was served (served: its logits [K], computed with `macs` MACs); runs its audit if drawn
        (dense_fn(): the plain model's logits of the same window). Returns the MACs the audit spent."""
        self.clips += 1
        self.served_macs += macs
        if not self._draw:
            return 0
        self._draw = False
        dense = dense_fn()
        error, agreement = self.fidelity.error(served, dense), self.fidelity.agreement(served, dense)
        self.measured += self.dense_macs
        self.audits += 1
        for errors, agreements in ((self.errors, self.agreements), (self.rung_errors, self.rung_agreements)):
            errors.append(error)
            agreements.append(agreement)
        self._check_floor()
        return self.dense_macs

    def _check_floor(self) -> None:
        if self.max_error is None and self.min_agreement is None:
            return
        n = len(self.rung_errors)
        if n < self.config.audits_to_lower:
            return
        error, (_, error_high), agreement, (agreement_low, _) = audit_estimate(
            self.rung_errors, self.rung_agreements, self.config.confidence)
        self.floor_missed = ((self.max_error is not None and error > self.max_error)
                             or (self.min_agreement is not None and agreement < self.min_agreement))
        if self.floor_missed and self.rung < len(self.taus) - 1:
            self._move(+1)
        elif not self.floor_missed and self.rung > 0 and n >= self.raise_after and (
                (self.max_error is None or error_high <= self.max_error)
                and (self.min_agreement is None or agreement_low >= self.min_agreement)):
            self._move(-1)

    def _move(self, step: int) -> None:
        if step > 0 and self._raised:  # the cheaper tau missed again: wait longer before the next try
            self.raise_after = min(16 * self.config.audits_to_raise, 2 * self.raise_after)
        self._raised = step < 0
        self.rung += step
        self.rung_errors.clear()
        self.rung_agreements.clear()
        self.floor_missed = False

    @property
    def floor_met(self) -> bool:
        """False while the current rung's audits miss the floor (a rung down follows unless this is tau 0)."""
        return not self.floor_missed

    def estimate(self) -> dict:
        """The stream's fidelity so far, from its latest MAX_AUDITS audits (what it was served, at whichever tau):
        `rel_l2` and `top1` with their intervals; None before the first audit."""
        base = {"audits": self.audits, "source": "audits" if self.audits else "none"}
        if not self.errors:
            return {**base, "rel_l2": None, "rel_l2_interval": (0.0, float("inf")), "top1": None,
                    "top1_interval": (0.0, 1.0)}
        error, error_interval, agreement, agreement_interval = audit_estimate(
            self.errors, self.agreements, self.config.confidence)
        return {**base, "rel_l2": error, "rel_l2_interval": error_interval, "top1": agreement,
                "top1_interval": agreement_interval}


__all__ = ["ClipAuditConfig", "ClipAudits"]
