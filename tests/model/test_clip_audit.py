"""A clip stream's audits (model/clip_audit.py): what they spend, what they report, and how a floor moves the
stream's tau, on scripted answers (served logits that miss the dense ones by a known amount per tau)."""

from __future__ import annotations

import math

import pytest
import torch

from model.clip_audit import ClipAuditConfig, ClipAudits
from model.fidelity import audit_estimate, rel_l2

DENSE = torch.tensor([2.0, 1.0, 0.0, -1.0])  # the plain model's logits [K] in every scripted clip


def _serve(audits: ClipAudits, clips: int, served_for_tau, macs: int = 100) -> list[tuple[float, float]]:
    """Serve `clips` clips; served_for_tau(tau) -> the logits served at that tau. Returns (tau, error) per audit."""
    log = []
    for _ in range(clips):
        audits.will_audit()
        tau = audits.tau
        served = served_for_tau(tau)
        if audits.after_clip(served, macs, lambda: DENSE.clone()):
            log.append((tau, rel_l2(served, DENSE)))
    return log


def test_audits_spend_at_most_their_share_of_the_stream_s_compute_and_use_it():
    audits = ClipAudits(0.1, dense_macs=400, config=ClipAuditConfig(audit_share=0.1))
    log = _serve(audits, 2000, lambda tau: DENSE + 0.1)
    served = 2000 * 100
    assert audits.measured == 400 * len(log) <= 0.1 * served  # never ahead of the share
    assert audits.measured >= 0.1 * served - 3 * 400  # nor far behind it (a few clips' draws)
    assert {tau for tau, _ in log} == {0.1}  # no floor: the server's tau throughout


def test_the_estimate_is_the_audits_mean_with_its_intervals_and_says_none_before_one():
    audits = ClipAudits(0.1, dense_macs=100, config=ClipAuditConfig(audit_share=0.5))
    first = audits.estimate()
    assert first["audits"] == 0 and first["source"] == "none" and first["rel_l2"] is None
    flips = iter([0.1, 3.0] * 200)  # every other clip's top-1 flips
    log = _serve(audits, 400, lambda tau: DENSE + torch.tensor([0.0, next(flips), 0.0, 0.0]))
    est = audits.estimate()
    errors = [e for _, e in log]
    agreements = [1.0 if e < 0.5 else 0.0 for e in errors]
    mean, interval, agreement, agreement_interval = audit_estimate(errors, agreements, 0.9)
    assert est["audits"] == len(log) >= 20 and est["source"] == "audits"
    assert est["rel_l2"] == pytest.approx(mean) and tuple(est["rel_l2_interval"]) == pytest.approx(interval)
    assert est["top1"] == pytest.approx(agreement) and 0 < agreement < 1
    assert agreement_interval[0] < agreement < agreement_interval[1]


def test_a_missed_floor_walks_the_tau_down_to_where_it_holds_and_tries_a_rung_back_up_ever_less_often():
    """Served error equal to tau (0 at tau 0): a floor of 0.03 holds at tau 0.025 and below."""
    config = ClipAuditConfig(audit_share=0.5, seed=3)
    audits = ClipAudits(0.1, dense_macs=100, config=config, max_error=0.03)
    assert audits.taus == [0.1, 0.05, 0.025, 0.0125, 0.0]
    log = _serve(audits, 400, lambda tau: DENSE * (1 + tau))  # rel L2 = tau
    taus = [tau for tau, _ in log]
    assert len(taus) >= 70
    # three audits a rung down to where it holds; eight there, a rung up that misses (three), then 16, 32 there
    assert taus[:3] == [0.1] * 3 and taus[3:6] == [0.05] * 3 and taus[6:14] == [0.025] * 8
    assert taus[14:17] == [0.05] * 3 and taus[17:33] == [0.025] * 16 and taus[33:36] == [0.05] * 3
    assert taus[36:68] == [0.025] * 32
    assert min(taus) == 0.025  # never below where the floor holds
    # the same seed: the same audits
    again = ClipAudits(0.1, dense_macs=100, config=config, max_error=0.03)
    assert _serve(again, 400, lambda tau: DENSE * (1 + tau)) == log


def test_a_floor_no_tau_meets_ends_at_tau_0_where_the_answer_is_the_plain_model_s():
    audits = ClipAudits(0.1, dense_macs=100, config=ClipAuditConfig(audit_share=0.5), min_agreement=1.0)
    _serve(audits, 400, lambda tau: DENSE if tau == 0 else -DENSE)  # any tau > 0 flips the top-1
    assert audits.tau == 0.0 and audits.floor_met
    assert audits.estimate()["top1_interval"][0] < 1.0  # the audits at the higher taus stay in what was served


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="audit_share"):
        ClipAuditConfig(audit_share=0.7)
    with pytest.raises(ValueError, match="tau"):
        ClipAudits(-0.1, dense_macs=100)
    assert ClipAudits(0.0, dense_macs=100).taus == [0.0]  # RLT off: one rung
    assert math.isinf(ClipAudits(0.1, dense_macs=100).estimate()["rel_l2_interval"][1])


def test_the_estimate_rests_on_the_latest_audits_and_counts_them_all(monkeypatch):
    monkeypatch.setattr("model.clip_audit.MAX_AUDITS", 16)
    audits = ClipAudits(0.1, dense_macs=100, config=ClipAuditConfig(audit_share=0.5))
    clip = iter(range(400))
    log = _serve(audits, 400, lambda tau: DENSE * (1.5 if next(clip) < 200 else 1.01))  # far off, then close
    assert len(log) > 32 and len(audits.errors) == 16 and audits.estimate()["audits"] == len(log)
    assert [e for _, e in log[-16:]] == pytest.approx([0.01] * 16, rel=1e-5)
    assert audits.estimate()["rel_l2"] == pytest.approx(0.01, rel=1e-5)
