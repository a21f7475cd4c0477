"""A per-stream policy chooser fed by online dense audits, at a fixed compute ratio.

The stream's compute per frame is 1/ratio of a dense frame. Up to a share of it (`audit_share`) pays for
measuring; the rest serves frames with the chosen policy: frame skipping, or keyframe + sparse at one of several
keyframe intervals, each with its token budget solved for the compute the share leaves. Frame skipping spends
whatever measuring leaves: its keyframe comes when the stream's credit holds a dense frame, so an audit (a dense
step that reseeds the stream) takes a keyframe's place instead of idling a reserved share, and a stream that
measures nothing computes exactly the frames fixed frame skipping does.

What it measures, all against the dense model's answer on the same frame, as the stream's fidelity measure compares
them (model/fidelity.py: logit rel-L2 and top-1 agreement for a classifier, box F1 and matched-box IoU for a
detector):
  - audits: on frames drawn at random, the dense model runs after the frame is served and the served answer is
    compared with it (a keyframe is an audit for free: its answer is the dense one). The dense result then
    reseeds the stream (its compute is not wasted). The audited errors give the stream's fidelity estimate with
    an interval (`estimate()`);
  - the reuse curve: every dense result (keyframes and audits) paired with the earlier ones gives the error of
    serving a result d frames old, e_reuse(d): what frame skipping at any interval would cost;
  - probes: to try a keyframe + sparse candidate without serving it, a copy of the stream's state taken at a
    keyframe runs the candidate's sparse step on the frames after (not served); at the first dense result at
    least k frames later its error against the dense answer, over e_reuse at the same age, is q_k, the share of
    the change that candidate's sparse frames miss. While a keyframe policy serves, a shadow (its sparse step
    on each keyframe, before the state is reseeded) keeps measuring q_k at age k, from at most `shadow_share` of
    the measuring share; the rest pays for audits of its sparse frames, each also a sample of q at its age.
Prediction: skip at the serving ratio costs the mean of e_reuse over its cycle; keyframe(k) costs q_k times the
mean of e_reuse over a cycle of k. The stream serves the candidate with the lowest prediction, frame skipping until a
candidate is measured better; candidates are explored in turn at the start, after a scene cut where one was
chosen, and every `reexplore_every` frames (doubling while none wins). A scene cut (a large global change of the
input) forces a keyframe and forgets what was measured. Two ways to explore (`explore`):
  - probe: as above; probing never changes what is served. A probe's sparse chain costs a sparse step a frame, so
    the 2 % share pays for the first one after 100-200 frames;
  - trial (the default): the candidate is served from the next keyframe, and its shadow on each of its keyframes
    gives q_k (one sparse step a sample, a few times cheaper). A trial starts once the share holds its shadows (45-90
    frames at 2 %); a candidate whose first sample predicts no gain is not served another cycle, nor again after a
    cut before the next exploration; a trial whose shadow the credit cannot pay ends at that keyframe; after the
    last one the stream goes back to its choice. It finds a better candidate within tens of frames of its start,
    and serves a few cycles of a worse one where none is better (docs/results.md: the two, measured).
"""

from __future__ import annotations

import functools
import math
import random
import statistics
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from model.config import ViTConfig
from model.fidelity import MAX_AUDITS, Fidelity, LogitFidelity, audit_estimate, t_quantile
from model.macs import dense_macs
from model.policy import StreamBudget
from model.schedule import FrameAction, FramePolicy, policy_for_ratio, sparse_frame_macs

EXPLORE = ("probe", "trial")  # how keyframe candidates are explored (AdaptiveConfig.explore)


@dataclass(frozen=True)
class AdaptiveConfig:
    audit_share: float = 0.02  # of the stream's compute spent on audits, shadows and probes
    intervals: tuple[int, ...] = (2, 3, 4, 6, 8)  # keyframe intervals tried (those above the serving ratio)
    max_interval_over_ratio: float = 3.0  # keyframe candidates up to this multiple of the serving ratio
    explore_candidates: int = 2  # keyframe candidates: the smallest intervals above the serving ratio
    shadows_per_candidate: int = 2  # q samples (shadows or probes) before a keyframe candidate counts as explored
    # of the measuring share, the most the chosen keyframe policy's shadows may take; the rest pays for audits (on its
    # sparse frames an audit also samples its q). A trial's shadows and probes are not held to it: exploring needs them
    shadow_share: float = 0.5
    # how a keyframe candidate is explored: "trial" serves it for a few of its cycles and measures q by the shadow
    # step on each of its keyframes (one sparse step a sample); "probe" runs its sparse chain unserved on a copy of
    # the state beside the serving policy (a sparse step every frame until a dense result meets the chain). Trial is
    # the default: it finds keyframe + sparse where it wins within the first hundred frames, where probing's share
    # pays for its first probe after 100-200 (docs/results.md, "Trial against probing": the clips and seeds)
    explore: str = "trial"
    switch_margin: float = 0.95  # a keyframe candidate replaces skipping only if predicted below this share
    switch_confidence: float = 0.8  # ... with its q taken at this one-sided upper bound of the samples' mean
    reexplore_every: int = 300  # frames between explorations
    cut_threshold: float = 0.3  # mean |change| of the 16x16-pooled normalised input that counts as a scene cut
    max_lag: int = 16  # reuse-curve ages kept
    confidence: float = 0.9
    audits_for_estimate: int = 8  # audits of frames not served dense before the estimate rests on audits alone
    model_error: float = 0.15  # relative error allowed for the curves' model of the frames served
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.audit_share <= 0.5:
            raise ValueError(f"audit_share must be in [0, 0.5], got {self.audit_share}")
        if not 0 <= self.shadow_share <= 1:
            raise ValueError(f"shadow_share must be in [0, 1], got {self.shadow_share}")
        if self.explore not in EXPLORE:
            raise ValueError(f"explore must be one of {', '.join(EXPLORE)}, got {self.explore!r}")


MAX_SAMPLES = 256


def _samples() -> deque:
    return deque(maxlen=MAX_SAMPLES)


@dataclass
class _Measures:
    # the latest samples only (MAX_SAMPLES each): a long-running stream's memory stays bounded, and old scenes age out
    reuse: dict[int, deque[float]] = field(default_factory=dict)  # age -> errors of a result that old
    reuse_agree: dict[int, deque[float]] = field(default_factory=dict)  # age -> agreement (top-1 kept) at that age
    q: dict[float, deque[float]] = field(default_factory=dict)  # keyframe interval -> shadow / probe ratios
    # (keyframe interval, age) -> the same ratios by the age of the sparse answer (a probe meets dense results at
    # ages below its interval too: the ages a served keyframe policy's sparse frames have)
    q_age: dict[tuple[float, int], deque[float]] = field(default_factory=dict)
    # the power laws fitted to reuse / reuse_agree (by name), until a sample is added: predictions and estimates ask
    # for them at every age of every candidate's cycle, after each dense result
    curves: dict[str, _PowerLaw] = field(default_factory=dict)

    def q_samples(self, interval: float, age: int) -> deque[float] | tuple:
        """A keyframe candidate's q samples for its sparse answers `age` frames old: that age's, from two of them,
        else all of the candidate's."""
        at = self.q_age.get((interval, age), ())
        return at if len(at) >= 2 else self.q.get(interval, ())

    def curve(self, name: str) -> _PowerLaw:
        """`reuse` (errors) or `disagreement` (1 - agreement), by age."""
        if name not in self.curves:
            samples = self.reuse if name == "reuse" else self.reuse_agree
            flip = name != "reuse"
            self.curves[name] = _PowerLaw({a: ((1.0 - statistics.fmean(v)) if flip else statistics.fmean(v), len(v))
                                           for a, v in samples.items() if v})
        return self.curves[name]


class AdaptiveSchedule:
    """Frame by frame: `next_action(image)`, the caller serves, `shadow_budget()` before a keyframe's dense step,
    then `after_frame(...)` (which may run an audit). Deterministic for a given seed. `fidelity` compares a served
    answer with the dense one (default: class logits)."""

    def __init__(self, config: ViTConfig, ratio: float, adaptive: AdaptiveConfig | None = None,
                 level: str = "tokenwise", fidelity: Fidelity | None = None):
        self.vit = config
        self.config = adaptive or AdaptiveConfig()
        self.fidelity: Fidelity = fidelity or LogitFidelity()
        self.level = level
        self.dense_macs = dense_macs(config)
        self._set_candidates(ratio)
        self.rng = random.Random(self.config.seed)
        self.measures = _Measures()  # since the last scene cut: what predictions rest on
        self.lifetime = _Measures()  # never forgotten at a cut (its latest samples): what the estimate rests on
        self.policy: FramePolicy = self.skip
        self.home: FramePolicy = self.skip  # the policy chosen (a trial serves a candidate instead, for a while)
        self.pending: FramePolicy | None = None  # takes over at the current policy's next keyframe
        self.shadowed: FramePolicy | None = None  # this keyframe ends a cycle of this keyframe policy
        self.phase = 0  # frames since the policy's schedule (re)started
        self.frame = 0
        self.spent = 0.0  # MACs of everything, served and measured
        # the stream's compute so far: 1/ratio of a dense frame per frame, plus the first frame's dense step; what
        # serving and measuring spent (a dense frame counted at dense MACs). Frame skipping spends what is left: its
        # keyframe comes when a dense frame fits, so measuring delays keyframes instead of idling a reserved share
        self.earned = float(self.dense_macs)
        self.charged = 0.0
        self.measured = 0.0  # MACs of audits, shadows and probes
        self.shadowing = 0.0  # MACs of shadows (held to `shadow_share` of the share while the chosen policy serves)
        self.dense_history: list[tuple[int, Any]] = []  # (frame, dense answer), recent
        self.audits = 0  # audits run, all of them
        self.audit_errors: deque[float] = deque(maxlen=MAX_AUDITS)  # the latest audits' errors
        self.audit_agree: deque[float] = deque(maxlen=MAX_AUDITS)  # ... 1/0 top-1 equal (classifier), box F1 (detector)
        self.audit_paid: deque[bool] = deque(maxlen=MAX_AUDITS)  # ... of a frame not served dense (a dense step paid)
        self.choices: dict[str, int] = {}
        # frames served, counted by (action, age of what they served, keyframe interval): bounded however long (ages
        # are frames since the last dense result, whichever served it: a keyframe or an audit)
        self.served_log: Counter[tuple[str, int, float | None]] = Counter()
        self.exploring = list(self.keyframes)
        self.lost: set[str] = set()  # candidates this exploration found hopeless (not tried again after a cut)
        self.last_explore = 0
        self.explore_gap = self.config.reexplore_every  # doubles while explorations find nothing better (to 8x)
        self._prev_pooled: torch.Tensor | None = None
        self._forced = False
        self._audit_draw = False
        self.probe: FramePolicy | None = None  # the candidate a probe copy of the state is running
        self.probe_start = 0
        self.probe_base: Any = None  # the dense answer of the frame the probe started from

    def _set_candidates(self, ratio: float) -> None:
        if ratio < 1:
            raise ValueError(f"compute ratio must be >= 1, got {ratio}")
        self.ratio = ratio
        # keyframe candidates leave the audit share for measuring; frame skipping spends whatever measuring leaves
        self.serving_ratio = max(1.0, ratio / (1.0 - self.config.audit_share))
        self.skip = policy_for_ratio("skip", ratio, self.vit)
        self.keyframes = [
            p for k in self.config.intervals
            if self.serving_ratio < k <= self.config.max_interval_over_ratio * self.serving_ratio
            and (p := policy_for_ratio("keyframe", self.serving_ratio, self.vit, interval=k, level=self.level))
            is not None and p.tokens > 0
        ][: self.config.explore_candidates]

    def set_ratio(self, ratio: float) -> None:
        """A new compute ratio (a fidelity floor asks for more compute, or allows less). The reuse curve is kept (it
        does not depend on the ratio); the candidates are solved again and explored afresh; the switch to the new
        skip interval happens at the next keyframe."""
        if ratio == self.ratio:
            return
        self._set_candidates(ratio)
        self.measures.q.clear()
        self.measures.q_age.clear()
        self.exploring = list(self.keyframes)
        self.lost.clear()
        self.home = self.skip
        self._start(self.skip)

    # ---- each frame ------------------------------------------------------------------------------

    def next_action(self, image: torch.Tensor) -> tuple[FrameAction, StreamBudget]:
        """This frame's action and budget. image: [3, H, W] (normalised), for the scene-cut test."""
        pooled = F.adaptive_avg_pool2d(image.float()[None], 16)[0]  # [3, 16, 16]
        change = float((pooled - self._prev_pooled).abs().mean()) if self._prev_pooled is not None else 0.0
        # a forced keyframe borrows at most one dense frame ahead of the stream's credit: a fast pan (a large change
        # frame after frame) forces one and is served by the schedule after, instead of a debt that starves it
        cut = change > self.config.cut_threshold and self.earned - self.charged >= 0
        self._prev_pooled = pooled
        if cut:
            self.measures = _Measures()
            self.dense_history.clear()
            # the new scene is explored at once where a keyframe candidate was chosen; where the exploration was
            # not over, its candidates are measured afresh but for those it found hopeless; where every candidate
            # lost, at the next exploration due: a cut changes the scene, not the model, resolution and camera that
            # made token reuse lose, and each trial or probe costs (a hand-held camera's fast pans count as cuts:
            # each one had started the trials again)
            if self.home.kind == "keyframe":
                self.lost.clear()
            if self.home.kind == "keyframe" or self.exploring:
                self.exploring = [p for p in self.keyframes if p.name not in self.lost]
                self.explore_gap = self.config.reexplore_every
            self.policy, self.pending, self.phase = self.skip, None, 0  # the cut frame is a keyframe
            self.home = self.skip
            self.probe = None  # its copy of the state is of the old scene (the caller drops it on the next start)
        elif self.frame - self.last_explore >= self.explore_gap and not self.exploring:
            self.exploring = [p for p in self.keyframes if p != self.policy] + (
                [self.policy] if self.policy in self.keyframes else [])
            self.measures.q.clear()
            self.measures.q_age.clear()
            self.lost.clear()
            self.last_explore = self.frame

        self._forced = cut
        self.shadowed = None
        keyframe = self._keyframe_now()
        if keyframe and not cut:
            if self.policy.kind == "keyframe" and self.phase > 0 and self.pending is None:
                self.shadowed = self.policy  # (a policy about to be replaced is not measured again)
                if self.policy != self.home:  # on trial; this keyframe ends its (phase / interval)-th cycle
                    # shadows that gave no sample (a still scene: nothing to compare the error with) leave the
                    # candidate unmeasured until the next exploration
                    cycles = self.phase / self.policy.interval
                    fruitless = cycles > self.config.shadows_per_candidate + 1 and bool(self.exploring)
                    if fruitless:
                        self.exploring.pop(0)
                    # a shadow the credit cannot pay (a forced keyframe took it) measures nothing: the stream goes
                    # home at this keyframe, and the trial starts again when the credit holds it
                    if fruitless or self.shadow_budget() is None:
                        self.shadowed, self.policy, self.phase = None, self.home, 0
            if self.pending is not None:  # a switch costs nothing extra: it happens on a keyframe
                self.policy, self.pending, self.phase = self.pending, None, 0
        action: FrameAction = "dense" if keyframe else "reuse" if self.policy.kind == "skip" else "sparse"
        self._audit_draw = self.rng.random() < self._audit_probability()
        self.choices[self.policy.name] = self.choices.get(self.policy.name, 0) + 1
        return action, self.policy.budget

    def _keyframe_now(self) -> bool:
        """Whether this frame is the serving policy's keyframe. Frame skipping's keyframes are paid from the stream's
        whole compute (a dense frame once the credit holds one: with nothing measured, exactly the frames where
        n / ratio passes an integer); a keyframe policy keeps its interval (its budget is solved for it)."""
        if self.phase == 0:
            return True
        if self.policy.kind == "skip":
            return self.earned - self.charged >= self.dense_macs * (1 - 1e-9)
        return self.policy.is_keyframe(self.phase)

    def will_audit(self, action: FrameAction) -> bool:
        """Whether `after_frame` audits this frame (drawn in `next_action`, so a planner can say it before the step):
        a dense frame is audited for free (its answer is the dense one), another one when the credit holds a
        dense frame."""
        return self._audit_draw and (action == "dense" or self._credit() >= self.dense_macs)

    def skip_audit(self) -> None:
        """This frame's audit is not run (the server found no time for it before a due frame): `after_frame` then
        records the frame unaudited, and the credit stays for a later audit."""
        self._audit_draw = False

    def shadow_budget(self) -> StreamBudget | None:
        """Before a keyframe's dense step: the sparse budget to run on this frame first (a shadow), or None."""
        if self.shadowed is None:
            return None
        cost = self._sparse_fraction(self.shadowed) * self.dense_macs  # paid from the measuring credit
        if self.shadowed == self.home and self.shadowing + cost > self.config.shadow_share * self._share():
            return None  # the rest of the share is the audits' (a stream on a keyframe policy is audited too)
        return self.shadowed.budget if self._credit() >= cost else None

    def after_frame(self, t: int, action: FrameAction, served: Any, dense_fn,
                    shadow: Any = None, shadow_macs: int = 0, served_macs: int = 0,
                    probes=None) -> tuple[int, bool]:
        """Record what was served; returns (extra MACs spent measuring, whether the state was reseeded by an audit).

        served: the answer served on this frame (as `fidelity` compares it: [K] logits, or Detections);
        dense_fn(): the dense answer of this frame (an audit); shadow: the shadow step's answer;
        probes: start() copies the stream's state (just seeded), step(budget) -> (answer, MACs) runs a sparse step
        of this frame on the copy, stop() drops it (None: no probing)."""
        extra = shadow_macs
        self.shadowing += shadow_macs
        reseeded = False
        dense = None
        age = 0 if action == "dense" else self._age(t)  # of the answer served (sparse: frames since its keyframe)
        if action == "dense":
            dense = served
            if shadow is not None:
                age = self._age(t)
                reuse = self._reuse_error(age, dense)
                if reuse is not None and reuse > 1e-6:
                    self._record_q(self.shadowed, age, self.fidelity.error(shadow, dense) / reuse, True)
            self._record_dense(t, dense)
            if self._audit_draw:
                self._record_audit(served, dense, paid=False)
        elif self._audit_draw and self._credit() >= self.dense_macs:
            dense = dense_fn()
            extra += self.dense_macs
            reuse = self._reuse_error(age, dense) if action == "sparse" else None
            if reuse is not None and reuse > 1e-6:  # a served sparse answer at its age: a sample of its policy's q
                self._record_q(self.policy, age, self.fidelity.error(served, dense) / reuse, False)
            self._record_audit(served, dense, paid=True)
            self._record_dense(t, dense)
            reseeded = True
        if probes is not None:
            extra += self._probe(t, dense, probes)
        interval = self.policy.interval if self.policy.kind == "keyframe" else None
        self.served_log[(action, age, interval)] += 1
        self.spent += served_macs + extra
        self.measured += extra
        served_cost = self.dense_macs if action == "dense" else served_macs if action == "sparse" else 0
        self.charged += served_cost + extra
        self.earned += self.dense_macs / self.ratio
        self.frame += 1
        # an audit's dense result reseeds the stream (and is what a skipping stream reuses); the schedule goes on
        self.phase += 1
        if dense is not None:  # predictions change only with a new dense result (a keyframe, an audit, a probe's end)
            self._maybe_choose()
        if action == "dense" and self.pending is not None:
            # this frame was dense anyway: it is the new policy's first keyframe (a switch costs nothing)
            self.policy, self.pending, self.phase = self.pending, None, 1
        return extra, reseeded

    def _probe(self, t: int, dense: Any, probes) -> int:
        """Advance, finish or start a probe of the next candidate; returns the MACs it spent."""
        spent = 0
        if self.probe is not None:
            answer, spent = probes.step(self.probe.budget)
            age = t - self.probe_start
            if dense is not None:  # a dense result meets the probe's sparse chain `age` frames after its start
                reuse = self.fidelity.error(self.probe_base, dense)
                done = age >= self.probe.interval
                if reuse > 1e-6:
                    self._record_q(self.probe, age, self.fidelity.error(answer, dense) / reuse, done)
                if done:
                    self.probe = None
            elif age > 4 * self.probe.interval:  # no dense result came: give up (a cut, a policy change)
                self.probe = None
            if self.probe is None:
                probes.stop()
        if (self.config.explore == "probe" and self.probe is None and dense is not None and self.exploring
                and not self._forced):
            candidate = self.exploring[0]
            frames = candidate.interval + self.skip.interval  # until the first dense result k frames on, at most
            cost = frames * self._sparse_fraction(candidate) * self.dense_macs
            if self._credit() - spent >= cost:
                probes.start()
                self.probe, self.probe_start, self.probe_base = candidate, t, dense
        return spent

    # ---- measuring -------------------------------------------------------------------------------

    def _audit_probability(self) -> float:
        """Once the credit holds a dense frame, each frame is audited with this probability (at a random phase of
        the serving cycle, so the audited frames are a fair sample); unspent credit is not left idle."""
        probing = self.probe is not None or bool(self.exploring)
        return 0.25 if self._credit() >= self.dense_macs and not probing else 0.0  # probes first

    def _share(self) -> float:
        """The audit share of the stream's compute so far (1/ratio of dense per frame), in MACs."""
        return (self.frame + 1) * self.config.audit_share * self.dense_macs / self.ratio

    def _share_credit(self) -> float:
        """The audit share of the stream's compute so far, less what measuring took."""
        return self._share() - self.measured

    def _credit(self) -> float:
        """MACs the stream may still spend measuring: its unspent share, as far as the stream's whole compute holds
        it with at most one dense frame of debt (which frame skipping pays back by a later keyframe)."""
        return min(self._share_credit(), self.earned - self.charged + self.dense_macs)

    def _age(self, t: int) -> int:
        return t - self.dense_history[-1][0] if self.dense_history else 0

    def _reuse_error(self, age: int, dense: Any) -> float | None:
        if not self.dense_history or age <= 0:
            return None
        return self.fidelity.error(self.dense_history[-1][1], dense)

    def _record_dense(self, t: int, dense: Any) -> None:
        for s, old in self.dense_history:
            age = t - s
            if 0 < age <= self.config.max_lag:
                error, agreement = self.fidelity.error(old, dense), self.fidelity.agreement(old, dense)
                for measures in (self.measures, self.lifetime):
                    measures.reuse.setdefault(age, _samples()).append(error)
                    measures.reuse_agree.setdefault(age, _samples()).append(agreement)
                    measures.curves.clear()
        self.dense_history.append((t, dense.detach() if isinstance(dense, torch.Tensor) else dense))
        self.dense_history = [(s, d) for s, d in self.dense_history if t - s < self.config.max_lag]

    def _record_audit(self, served: Any, dense: Any, paid: bool) -> None:
        self.audits += 1
        self.audit_paid.append(paid)
        self.audit_errors.append(self.fidelity.error(served, dense))
        self.audit_agree.append(self.fidelity.agreement(served, dense))

    def _record_q(self, policy: FramePolicy, age: int, q: float, pooled: bool) -> None:
        """A sample of a keyframe candidate's q at this age; pooled: it also counts for the candidate as a whole
        (a probe's end or a shadow: the samples exploring counts). Predictions read those since the last
        exploration; the estimate the stream's lifetime ones (their latest MAX_SAMPLES), since the frames served
        before an exploration or a scene cut still count in it."""
        for measures in (self.measures, self.lifetime):
            measures.q_age.setdefault((policy.interval, age), _samples()).append(q)
            if pooled:
                measures.q.setdefault(policy.interval, _samples()).append(q)

    def _q_at(self, interval: float, age: int, upper: bool = False) -> float | None:
        """q of a keyframe candidate's sparse answer `age` frames after its keyframe: from the samples at that age
        (two or more), else from all of the candidate's; the median, or (upper) the one-sided upper bound of the
        mean at `switch_confidence`; None without two samples to bound."""
        samples = self.measures.q_samples(interval, age)
        if not samples or (upper and len(samples) < 2):
            return None
        if not upper:
            return statistics.median(samples)
        t = t_quantile(2 * self.config.switch_confidence - 1, len(samples) - 1)
        return statistics.fmean(samples) + t * statistics.stdev(samples) / math.sqrt(len(samples))

    def _sparse_fraction(self, policy: FramePolicy) -> float:
        return sparse_frame_macs(self.vit, policy.tokens, self.level) / self.dense_macs

    # ---- predicting and choosing -----------------------------------------------------------------

    def reuse_curve(self, age: int, measures: _Measures | None = None) -> float | None:
        """e_reuse(age): measured where there are samples, else a power law fitted to the ages that have them.
        measures: the scene's since its last cut (default: what predictions use), or the stream's lifetime ones."""
        if age <= 0:
            return 0.0
        return (measures or self.measures).curve("reuse")(age)

    def _agreement_at(self, age: int, measures: _Measures | None = None) -> float:
        """Agreement (top-1, box F1) of a result `age` frames old: measured where that age has samples, else 1 less
        a power law of the disagreement fitted to the ages that have them (it rises fastest over the first frames);
        1 before anything is measured."""
        disagreement = (measures or self.measures).curve("disagreement")(age)
        return 1.0 if disagreement is None else max(0.0, 1.0 - disagreement)

    @staticmethod
    @functools.cache
    def _cycle_ages(interval: float) -> tuple[int, ...]:
        """The age of the answer served on each frame of frame skipping at this interval (0 on its keyframes)."""
        policy = FramePolicy("skip", interval=interval)
        ages, age = [], 0
        for n in range(48):
            age = 0 if policy.is_keyframe(n) else age + 1
            ages.append(age)
        return tuple(ages)

    def _cycle_mean(self, interval: float) -> float | None:
        """Mean e_reuse over the frames of a skip cycle of this interval (0 on its keyframes)."""
        values = [self.reuse_curve(a) for a in self._cycle_ages(interval)]
        return None if any(v is None for v in values) else statistics.fmean(values)

    def predicted_at(self, ratio: float) -> tuple[float | None, float | None]:
        """(error, agreement) frame skipping is predicted to serve from now on at this compute ratio (its audit
        share kept), from the measured reuse curves; None before they have samples."""
        serving = max(1.0, ratio / (1.0 - self.config.audit_share))
        ages = self._cycle_ages(serving)
        error = self._cycle_mean(serving)
        if error is None:
            return None, None
        return error, statistics.fmean(1.0 if a == 0 else self._agreement_at(a) for a in ages)

    def ratio_for_floor(self, max_error: float | None, min_agreement: float | None, limit: float,
                        margin: float = 0.1) -> float | None:
        """The largest compute ratio, at most `limit`, whose predicted error and agreement meet the floor with a
        margin (a tenth of the error floor, a tenth of the disagreement the agreement floor allows); 1 (every frame
        dense, the dense answer) where none does; None before the curves have samples."""
        ratio = limit
        while ratio > 1.0:
            error, agreement = self.predicted_at(ratio)
            if error is None:
                return None
            if (max_error is None or error <= (1 - margin) * max_error) and (
                    min_agreement is None or agreement >= min_agreement + margin * (1 - min_agreement)):
                return ratio
            ratio = max(1.0, ratio * 0.9)
        return 1.0

    def predictions(self, upper: bool = False) -> dict[str, float]:
        """Each candidate's predicted mean error at the serving ratio. upper: a keyframe candidate's q at the upper
        bound of its samples' mean (`switch_confidence`, one-sided; none with fewer than two samples), so one lucky
        probe does not move the stream."""
        out = {}
        skip = self._cycle_mean(self.serving_ratio)  # at most the audit share goes to measuring: as the candidates
        if skip is not None:
            out[self.skip.name] = skip
        for policy in self.keyframes:  # a cycle: the keyframe (no error), then sparse answers of ages 1 .. k - 1
            errors = []
            for age in self._cycle_ages(policy.interval):
                q = 0.0 if age == 0 else self._q_at(policy.interval, age, upper)
                e = self.reuse_curve(age)
                if q is None or e is None:
                    break
                errors.append(q * e)
            else:
                out[policy.name] = statistics.fmean(errors)
        return out

    def _trial(self, candidate: FramePolicy) -> None:
        """Serve the candidate under exploration (from the current policy's next keyframe) once the measuring credit
        holds the shadow steps it still needs: its q samples come from the shadow on each of its keyframes. Until
        then the stream serves the policy chosen (a candidate whose trial ended waits there, not served on)."""
        needed = self.config.shadows_per_candidate - len(self.measures.q.get(candidate.interval, ()))
        if self._target() == candidate or self.reuse_curve(1) is None:  # (after a cut: once skipping is measured)
            return
        funded = self._credit() >= needed * self._sparse_fraction(candidate) * self.dense_macs
        self._start(candidate if funded else self.home)

    def _hopeless(self, candidate: FramePolicy) -> bool:
        """On trial, a candidate whose first samples already predict no gain over frame skipping (on their median)
        is not served another cycle: its sparse frames are what a trial risks."""
        if self.config.explore != "trial":
            return False
        predictions = self.predictions()
        return (candidate.name in predictions and self.skip.name in predictions
                and predictions[candidate.name] >= self.config.switch_margin * predictions[self.skip.name])

    def _start(self, policy: FramePolicy) -> None:
        """Switch at the current policy's next keyframe (or stay, cancelling a pending switch)."""
        self.pending = None if policy == self.policy else policy

    def _target(self) -> FramePolicy:
        return self.pending or self.policy

    def _maybe_choose(self) -> None:
        if self.exploring:
            current = self.exploring[0]
            samples = len(self.measures.q.get(current.interval, []))
            hopeless = bool(samples) and self._hopeless(current)
            if samples >= self.config.shadows_per_candidate or hopeless:
                self.exploring.pop(0)
                if hopeless:
                    self.lost.add(current.name)
            if self.exploring:
                if self.config.explore == "trial":
                    self._trial(self.exploring[0])
                return
            self._start(self.home)  # the last trial ends (the choice below may move on from there)
            self.last_explore = self.frame
            explored = True
        else:
            explored = False
        # a candidate takes over on evidence (its upper bound); the one serving keeps its place on its median
        predictions = {**self.predictions(upper=True),
                       **{k: v for k, v in self.predictions().items() if k == self.home.name}}
        if self.skip.name not in predictions:
            return
        best = min((p for p in self.keyframes if p.name in predictions), key=lambda p: predictions[p.name],
                   default=None)
        choice = self.skip
        if best is not None and predictions[best.name] < self.config.switch_margin * predictions[self.skip.name]:
            choice = best
        if explored:  # probing spends the measuring share: the less it finds, the less often it is done again
            self.explore_gap = (self.config.reexplore_every if choice != self.skip
                                else min(8 * self.config.reexplore_every, 2 * self.explore_gap))
        self.home = choice
        if choice != self._target():
            self._start(choice)

    # ---- what the stream reports -----------------------------------------------------------------

    def estimate(self) -> dict:
        """The stream's fidelity so far (mean error and agreement over its served frames, keyed by the fidelity
        measure's names: `rel_l2` and `top1` for a classifier, `box_error` and `box_f1` for a detector), with
        intervals. With enough audits, from the audits alone (the agreement's interval is Wilson's, exact for top-1,
        conservative for a box F1 in [0, 1]); before that, from the measured curves applied to the frames served (a
        reused result of age d costs e_reuse(d); a sparse frame q_k e_reuse(d)). Enough audits means that many of
        frames not served dense: the free audits of dense frames (error 0) are a fair part of the sample but say nothing
        of the frames not computed, whose errors (a few large ones, in fades and pans) are the whole mean."""
        if sum(self.audit_paid) >= self.config.audits_for_estimate:  # of the latest MAX_AUDITS
            estimate = audit_estimate(self.audit_errors, self.audit_agree, self.config.confidence)
            return self._named(self.audits, "audits", *estimate)
        return self._modelled_estimate(self.audits,
                                       statistics.NormalDist().inv_cdf(0.5 + self.config.confidence / 2))

    def _named(self, audits: int, source: str, error: float | None, error_interval: tuple[float, float],
               agreement: float | None, agreement_interval: tuple[float, float]) -> dict:
        e, a = self.fidelity.error_name, self.fidelity.agreement_name
        return {"audits": audits, "source": source, e: error, f"{e}_interval": error_interval, a: agreement,
                f"{a}_interval": agreement_interval, "policy": self.policy.name}

    def _modelled_estimate(self, audits: int, z: float) -> dict:
        errors, agreement, spreads, counts, weights = [], [], [], [], []
        for (action, age, interval), frames in self.served_log.items():
            weights.append(frames)
            if action == "dense" or age == 0:
                errors.append(0.0)
                agreement.append(1.0)
                counts.append(math.inf)
                continue
            e = self.reuse_curve(age, self.lifetime)
            # an age measured on fewer than MIN_MEASURED pairs is read from the curves, as predictions read it
            samples = self.lifetime.reuse.get(age, ())
            agree = self.lifetime.reuse_agree.get(age, ())
            if e is None:
                return self._named(audits, "none", None, (0.0, math.inf), None, (0.0, 1.0))
            rse = (statistics.stdev(samples) / math.sqrt(len(samples)) / max(e, 1e-9)
                   if len(samples) >= MIN_MEASURED else 0.5)
            agreement_measured = len(agree) >= MIN_MEASURED
            p_agree = statistics.fmean(agree) if agreement_measured else self._agreement_at(age, self.lifetime)
            counts.append(len(agree) if agreement_measured else 1)
            if action == "sparse" and interval is not None and self.lifetime.q.get(interval):
                qs = self.lifetime.q_samples(interval, age)  # as predictions read q
                q = statistics.median(qs)
                e, p_agree = q * e, 1.0 - min(1.0, q) * (1.0 - p_agree)
                rse = math.hypot(rse, 0.5 if len(qs) < 2 else statistics.stdev(qs) / math.sqrt(len(qs)) / max(q, 1e-9))
            errors.append(e)
            agreement.append(p_agree)
            spreads.append(rse)
        if not errors:
            return self._named(audits, "none", None, (0.0, math.inf), None, (0.0, 1.0))
        n = sum(weights)
        mean = sum(w * e for w, e in zip(weights, errors, strict=True)) / n
        agreed = sum(w * p for w, p in zip(weights, agreement, strict=True)) / n
        rse = max(spreads, default=0.0) + self.config.model_error
        # each age's agreement is a share measured on `count` pairs of that age (binomial spread); the mean over the
        # frames weights it by its frames: Var = sum((w / n)^2 p (1 - p) / c)
        variance = sum(w * w * max(p * (1 - p), 0.05) / c
                       for w, p, c in zip(weights, agreement, counts, strict=True) if c != math.inf)
        # plus the curves' model error: half the disagreement rate either way (ages are interpolated), and a point
        half = z * math.sqrt(variance) / n + 0.5 * (1 - agreed) + 0.01
        return self._named(audits, "model", mean, (max(0.0, mean * (1 - z * rse)), mean * (1 + z * rse)), agreed,
                           (max(0.0, agreed - half), min(1.0, agreed + half)))

    def choice_counts(self) -> dict[str, int]:
        return dict(self.choices)


MIN_MEASURED = 3  # samples before an age's mean stands for that age alone


def _monotone(means: dict[int, tuple[float, int]]) -> dict[int, tuple[float, int]]:
    """The means made non-decreasing in the age (pooling adjacent violators, weighted by samples): an older answer
    is not expected to be closer to the dense one than a younger one, and ages measured on a few frames of one part
    of the clip (audits, trials) would otherwise put a bump or a dip in the curve between ages measured all along."""
    blocks: list[list] = []  # [weighted sum, samples, ages]
    for age in sorted(means):
        mean, n = means[age]
        blocks.append([mean * n, n, [age]])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count, ages = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
            blocks[-1][2] += ages
    return {age: (total / count, means[age][1]) for total, count, ages in blocks for age in ages}


class _PowerLaw:
    """Fitted to means[age] = (mean, samples): the mean where measured on MIN_MEASURED samples or more (made
    non-decreasing in the age, `_monotone`), else a power law in the age fitted to those ages (log-log least squares
    weighted by their samples; exponent 0.2-1.5, 0.7 from a single age), or to every measured age while none has that
    many; None with nothing measured. An age seen once or twice is noise: a pair of identical frames (a still title,
    a duplicated frame) gives 0, which taken as the age's mean makes every frame served at that age look exact, and as
    a point of the fit (log 1e-6) tilts it."""

    def __init__(self, means: dict[int, tuple[float, int]]):
        trusted = _monotone({a: v for a, v in means.items() if v[1] >= MIN_MEASURED})
        self.means = trusted
        points = [(math.log(a), math.log(max(m, 1e-6)), n) for a, (m, n) in (trusted or _monotone(means)).items()]
        self.fitted = bool(points)
        if not points:
            return
        total = sum(n for _, _, n in points)
        self.mx = sum(n * x for x, _, n in points) / total
        self.my = sum(n * y for _, y, n in points) / total
        var = sum(n * (x - self.mx) ** 2 for x, _, n in points)
        self.alpha = (min(1.5, max(0.2, sum(n * (x - self.mx) * (y - self.my) for x, y, n in points) / var))
                      if var > 0 else 0.7)

    def __call__(self, age: int) -> float | None:
        if age in self.means:
            return self.means[age][0]
        if not self.fitted:
            return None
        return math.exp(self.my + self.alpha * (math.log(age) - self.mx))


__all__ = ["AdaptiveConfig", "AdaptiveSchedule"]
