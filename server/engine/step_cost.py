"""The step-time models behind the budget controller's feed-forward: the eventful step's cost, learned online, and
the plain dense step's, per batch size; and the water level that shares a token budget among streams with caps.

Pure: no threads, no clock, no torch.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import numpy as np


class StepCostModel:
    """step_s = a + b*batch + c*tokens/num_patches, by recursive least squares with forgetting.

    Robust to the ways online fits fail: the covariance is bounded (no wind-up while the operating point stays
    put), a single outlier is clipped to a factor of the prediction, and three predictions in a row off by more
    than `shift_ratio` (a device that slowed down or sped up) rescale the model at once. A slowdown that passes (the
    host contended for a moment) is undone: while `revert_steps` steps after it, three in a row that the model from
    before it predicts better than the rescaled one (and within `shift_ratio`) restore that model as it was (where
    it had `settled_steps` behind it: a fit still learning shifts to correct itself, not to follow the device)."""

    def __init__(
        self, num_patches: int, prior: tuple[float, float, float] = (0.002, 0.002, 0.02), forgetting: float = 0.99,
        max_trace: float = 1.0, shift_ratio: float = 1.3, stream_tokens_prior: float = 8.0, prior_weight: float = 0.05,
        token_floor_load: float = 0.5, revert_steps: int = 30, settled_steps: int = 50,
    ):
        self.num_patches = num_patches
        # a weak prior that a stream's own cost (b) is that of stream_tokens_prior patch tokens: with data from one or
        # two batch sizes, b and c cannot be told apart, and a fit without it extrapolates to other batch sizes wildly
        self._prior_x = math.sqrt(prior_weight) * np.array([0.0, 1.0, -stream_tokens_prior / num_patches])
        self.theta = np.array(prior, dtype=np.float64)
        self.cov = np.eye(3)
        self.forgetting = forgetting
        self.max_trace = max_trace
        self.shift_ratio = shift_ratio
        self.observations = 0
        self.shifts = 0  # times the model was rescaled to follow a shift
        self.last_shift = 1.0  # the factor of the last (> 1: the device got slower)
        self.reverted = False  # the last shift undid a slowdown that passed (the model from before it is back)
        self.revert_steps = revert_steps
        self.revert = True  # a slowdown that passes is undone (False: every slowdown is kept until the next shift)
        self.settled_steps = settled_steps
        self._before_slowdown: tuple | None = None  # the fit before the last slowdown (while it may be undone)
        self._since_slowdown = 0
        self._fits: deque[tuple] = deque(maxlen=3)  # the fit before each of the last steps
        self._old_ratios: deque[tuple[float, float]] = deque(maxlen=3)  # the last steps over what it and this predict
        self._ratios: deque[float] = deque(maxlen=3)
        self._log_bias = 0.0  # moving mean of log(observed / predicted) ...
        self._log_var = 0.0  # ... and the variance around it: the step time's noise (a bias is not noise)
        self._mean_step = 0.0
        self._mean_x_tokens = 0.0
        self.token_floor_load = token_floor_load

    @property
    def noise(self) -> float:
        """The step time's spread around the model: the std of log(observed / predicted)."""
        return math.sqrt(self._log_var)

    def _x(self, batch: int, tokens: float) -> np.ndarray:
        return np.array([1.0, float(batch), tokens / self.num_patches])

    def predict(self, batch: int, tokens: float) -> float:
        return max(1e-6, float(self._x(batch, tokens) @ self.theta))

    def observe(self, batch: int, tokens: float, seconds: float) -> None:
        """A step over `batch` frames that updated `tokens` patch tokens per gate in all took `seconds`."""
        if batch < 1 or not seconds > 0:
            return
        x = self._x(batch, tokens)
        predicted = self.predict(batch, tokens)
        ratio = seconds / predicted
        if self._passed(x, seconds, ratio):
            return
        self._ratios.append(ratio)
        self._fits.append(self._fit())
        # a shift: three steps in a row off the same way by more than the noise explains (2.5 sigma, at least 30 %)
        limit = max(math.log(self.shift_ratio), 2.5 * math.sqrt(self._log_var))
        if self.observations >= 5 and len(self._ratios) == 3 and (
            all(math.log(r) > limit for r in self._ratios) or all(math.log(r) < -limit for r in self._ratios)
        ):
            # follow it now: a slowdown by the median of the three, a speed-up by the least of them (rising is slow)
            slower = self._ratios[0] > 1
            self.last_shift = float(np.median(self._ratios)) if slower else max(self._ratios)
            self.reverted = False
            self._before_slowdown = None
            # (before settled_steps, shifts correct the fit)
            if slower and self.revert and self.observations >= self.settled_steps:
                self._before_slowdown = self._fits[0]  # as it was before the first of the three
                self._since_slowdown = 0
                self._old_ratios.clear()
            self.theta *= self.last_shift
            self.shifts += 1
            self._ratios.clear()
            predicted = self.predict(batch, tokens)
        elif self.observations >= 5:
            log_ratio = min(max(math.log(ratio), -1.0), 1.0)
            self._log_bias += 0.2 * (log_ratio - self._log_bias)
            self._log_var += 0.05 * ((log_ratio - self._log_bias) ** 2 - self._log_var)
        if self.observations >= 5:
            seconds = min(max(seconds, 0.5 * predicted), 2.0 * predicted)  # one outlier moves the fit little
        self._rls(x, seconds, self.forgetting)
        self._rls(self._prior_x, 0.0, 1.0)
        trace = float(np.trace(self.cov))
        if trace > self.max_trace:
            self.cov *= self.max_trace / trace
        self.observations += 1
        weight = 0.1 if self.observations > 10 else 1.0 / self.observations
        self._mean_step += weight * (seconds - self._mean_step)
        self._mean_x_tokens += weight * (x[2] - self._mean_x_tokens)
        self._project()

    def _fit(self) -> tuple:
        """What a step changes (to restore it)."""
        return (self.theta.copy(), self.cov.copy(), self._log_bias, self._log_var, self._mean_step,
                self._mean_x_tokens)

    def _passed(self, x: np.ndarray, seconds: float, ratio: float) -> bool:
        """Whether this step ends a slowdown that passed: the fit from before it is restored (a shift)."""
        if self._before_slowdown is None:
            return False
        self._since_slowdown += 1
        if self._since_slowdown > self.revert_steps:
            self._before_slowdown = None
            return False
        theta = self._before_slowdown[0]
        self._old_ratios.append((seconds / max(1e-6, float(x @ theta)), ratio))
        # closer to the model from before than to the rescaled one, three in a row (and within shift_ratio of it)
        limit = math.log(self.shift_ratio)
        if len(self._old_ratios) < 3 or any(
            abs(math.log(old)) >= min(limit, abs(math.log(new))) or new >= 1 for old, new in self._old_ratios
        ):
            return False
        theta, self.cov, self._log_bias, self._log_var, self._mean_step, self._mean_x_tokens = self._before_slowdown
        self.last_shift = float(theta @ x) / float(self.theta @ x)
        self.theta = theta
        self.shifts += 1
        self.reverted = True
        self._before_slowdown = None
        self._ratios.clear()
        return True

    def calibrate(self, steps: Sequence[tuple[int, float, float]]) -> None:
        """Start from measured steps, (batch, tokens, seconds) at a few batch sizes and budgets (the engine's
        warm-up), instead of the prior: a least-squares fit with the weak prior on b. From the prior alone, the
        first join on this CPU got r = 141 at 4 streams (predicted 68 ms; live ~300). The covariance stays wide:
        the warm-up ran on a quiet device, and the steps served under load take over as fast as before (with the
        covariance of these few steps, following a slowdown took up to 10 s in simulation instead of 1.5)."""
        steps = [(b, t, s) for b, t, s in steps if b >= 1 and s > 0]
        if not steps:
            return
        rows = np.array([self._x(b, t) for b, t, _ in steps] + [self._prior_x])
        seconds = np.array([s for _, _, s in steps] + [0.0])
        self.theta = np.linalg.lstsq(rows, seconds, rcond=None)[0]
        self.observations += len(steps)
        self._mean_step = float(np.mean(seconds[:-1]))
        self._mean_x_tokens = float(np.mean(rows[:-1, 2]))
        self._project()

    def _rls(self, x: np.ndarray, y: float, forgetting: float) -> None:
        gain = self.cov @ x / (forgetting + x @ self.cov @ x)
        self.theta = self.theta + gain * (y - x @ self.theta)
        self.cov = (self.cov - np.outer(gain, x @ self.cov)) / forgetting

    def _project(self) -> None:
        """Physical signs: a, b >= 0, and the token cost at least a tenth of the mean step per mean token load, the
        load counted as at least token_floor_load dense frames a step (a fit at one operating point can make the cost
        vanish, and r would then swing between its bounds; but steps at the minimum r, shedding, carry a token load
        near 0, and a floor per that load made the token cost 3x the device's: after 8 streams at r = 4 the cost
        model gave 4 streams r 18-40 where 58 fit).

        A sign is restored along the fit's covariance: what the data cannot tell from that parameter moves with it.
        Every stream at one r makes the token load proportional to the batch, so b and c are told apart by the prior
        alone; on a device whose step is flat in r (launch-bound), the fit leans to b < 0, and clamping b alone kept
        the rise in c each step brought: c climbed 7x in 5 s while every step took 15 ms."""
        for i in (1, 0):
            if self.theta[i] < 0 and self.cov[i, i] > 0:
                self.theta = self.theta - self.cov[:, i] * self.theta[i] / self.cov[i, i]
        self.theta[0] = max(self.theta[0], 0.0)
        self.theta[1] = max(self.theta[1], 0.0)
        floor = 0.1 * self._mean_step / max(self._mean_x_tokens, self.token_floor_load)
        self.theta[2] = max(self.theta[2], floor, 1e-7)

    def level_within(self, budget_s: float, batch: int, fixed_tokens: float, caps: Sequence[float]) -> float:
        """The largest water level L with predict(batch, fixed + sum(min(cap, L))) <= budget_s (may be < 0)."""
        a, b, c = self.theta
        room = (budget_s - a - b * batch) * self.num_patches / c - fixed_tokens  # tokens the controlled may take
        return water_level(room, caps)


class DenseStepModel:
    """The plain dense step (every stream at the full budget runs the unmodified model): seconds per batch size.

    Not the eventful model at full tokens: that pays gathers, scatters and reference updates on every token and
    costs more than the plain model (on this CPU, r = 182 of 196 takes 1.4x the dense step; on a GPU, DeiT-Tiny's
    dense step is cheaper than any eventful one). A moving mean per batch size seen; an unseen size is scaled from
    the nearest smaller one (every part of the step proportional to the batch: an over-estimate) or taken from the
    nearest larger one (an over-estimate too)."""

    def __init__(self, weight: float = 0.2):
        self.weight = weight
        self._seconds: dict[int, float] = {}

    def observe(self, batch: int, seconds: float) -> None:
        if batch < 1 or not seconds > 0:
            return
        old = self._seconds.get(batch)
        self._seconds[batch] = seconds if old is None else old + self.weight * (seconds - old)

    def predict(self, batch: int) -> float | None:
        """None until a dense step was seen."""
        if batch in self._seconds:
            return self._seconds[batch]
        smaller = [b for b in self._seconds if b < batch]
        if smaller:
            b = max(smaller)
            return self._seconds[b] * batch / b
        larger = [b for b in self._seconds if b > batch]
        return self._seconds[min(larger)] if larger else None


def water_level(total: float, caps: Sequence[float]) -> float:
    """L with sum(min(cap_i, L)) == total (caps may be inf); total / n when nothing is capped, inf if all are
    capped below it, negative when total < 0."""
    if not caps:
        return math.inf
    remaining, left = total, len(caps)
    for cap in sorted(caps):
        if cap * left >= remaining:
            return remaining / left
        remaining -= cap
        left -= 1
    return math.inf
