"""The budget controller's ablation in simulation: what each mechanism beyond the core is worth, per device profile.

For every device profile of the simulator (tests/server/controller_sim.py: "cpu", "gpu") and scenario (load steps
1 -> 4 -> 8 -> 4 -> 1, host contention, an overload no r meets), over seeds, the controller runs with every mechanism
as configured and with each mechanism off in turn, against fixed budgets on the same timelines. Per run: the p95
over the target in each steady phase, the time to re-settle after each load step, the mean r over the best fixed r
(the largest that meets the target), frames served per second, and whether some fixed r serves more frames at a
lower p95 (auto mode is then wrong). A mechanism earns its place where turning it off worsens a target metric by
more than the spread across seeds on one profile and improves none on any.

    python -m bench.controller_ablation --seeds 6 --json out/controller_ablation.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace

from server.engine.controller import ControllerConfig
from tests.server.controller_sim import (
    PROFILES,
    Phase,
    SimConfig,
    SimTrace,
    controller_decider,
    fixed_decider,
    new_controller,
    simulate,
)

MIN_TOKENS = 4
STEADY_AFTER_S = 3.0  # a phase's steady part starts this long after its step
FIXED_GRID = (4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 196)  # fixed budgets auto mode is compared with
DOMINANCE_MARGIN = 0.05  # auto mode is wrong where a fixed r serves this share more frames at a p95 no higher

# each mechanism beyond the core: the settings that switch it (alone) on, and off
MECHANISMS: dict[str, tuple[dict[str, object], dict[str, object]]] = {
    "knee_memory": ({"knee_memory": True}, {"knee_memory": False}),
    "tail_cap": ({"tail_cap": True}, {"tail_cap": False}),
    "noise_aim": ({"noise_aim": True}, {"noise_aim": False}),
    "capacity": ({"capacity": 0.95}, {"capacity": None}),
    "load_memory": ({"load_memory": True}, {"load_memory": False}),
    "drain_restore": ({"drain_restore": True}, {"drain_restore": False}),
    "slowdown_revert": ({"slowdown_revert": True}, {"slowdown_revert": False}),
    "shed_regime": ({"shed_regime": True}, {"shed_regime": False}),
    "seed_pricing": ({"seed_pricing": True}, {"seed_pricing": False}),
    "shed_must_pay": ({"shed_must_pay": True}, {"shed_must_pay": False}),
    "dense_hysteresis": ({"dense_hysteresis": 0.1}, {"dense_hysteresis": None}),
}
ALL_ON = {k: v for on, _ in MECHANISMS.values() for k, v in on.items()}  # every mechanism on (as before the ablation)

# a target metric, whether larger is worse, and the least change that counts (below it, a difference is rounding)
METRICS: dict[str, tuple[str, float]] = {
    "p95_over": ("the worst steady phase's p95 over the target, less 1 (0: within it), where some fixed r meets it",
                 0.02),
    "settle_s": ("the longest re-settling after a step: until the last second's p95 stays under 1.1x the target for "
                 "2 s, as the live bench measures it (s)", 0.25),
    "r_short": ("1 less the least mean r of a steady phase over the best fixed r (< 0: over it)", 0.02),
    "dominated": ("how many more frames/s a fixed r serves at a lower p95 than auto mode, as a share", 0.02),
}


@dataclass(frozen=True)
class Scenario:
    name: str
    profile: str
    phases: tuple[Phase, ...]
    duration_s: float
    target_s: float
    sim: tuple[tuple[str, float], ...] = ()  # overrides of the profile

    def sim_config(self, seed: int) -> SimConfig:
        return replace(PROFILES[self.profile], seed=seed, **dict(self.sim))

    def spans(self) -> list[tuple[Phase, float, float]]:
        ends = [p.start_s for p in self.phases[1:]] + [self.duration_s]
        return [(p, p.start_s, e) for p, e in zip(self.phases, ends, strict=True)]


STEPS = (Phase(0, 1), Phase(10, 4), Phase(20, 8), Phase(30, 4), Phase(40, 1))
SLOWDOWN = (Phase(0, 4), Phase(10, 4, speed=1.6), Phase(20, 4))  # the device 1.6x slower for 10 s
CONTENTION = (("stall_rate", 0.2), ("stall_s", 0.15), ("slow_rate", 0.1), ("slow_s", 0.6), ("slow_factor", 1.5))
SCENARIOS = (
    Scenario("steps", "cpu", STEPS, 50, 0.150),
    Scenario("slowdown", "cpu", SLOWDOWN, 30, 0.150),
    Scenario("contention", "cpu", (Phase(0, 1), Phase(10, 4)), 30, 0.150, CONTENTION),
    Scenario("overload", "cpu", (Phase(0, 4), Phase(8, 8, speed=1.3)), 20, 0.150),  # past the capacity at r = 4
    Scenario("steps", "gpu", STEPS, 50, 0.050),
    Scenario("slowdown", "gpu", SLOWDOWN, 30, 0.050),
    # the live H200 run (ViT-L, 10 fps cameras): most of the latency is off the device (decoding, transfers)
    Scenario("overload", "gpu", (Phase(0, 1), Phase(8, 8)), 20, 0.060,
             (("fps", 10), ("decode_s", 0.012), ("overhead_s", 0.03))),
)


def phase_stats(trace: SimTrace, start: float, end: float, target_s: float) -> tuple[float, float, float]:
    """A steady stretch's p95 over the target, mean r and frames/s."""
    frames = trace.window(start, end)
    if not frames:
        return math.inf, 0.0, 0.0
    return trace.p95(start, end) / target_s, trace.mean_tokens(start, end), len(frames) / (end - start)


def fixed_baseline(scenario: Scenario, seed: int) -> list[dict]:
    """Per phase of the scenario, on its own timeline (the same joins, noise and stalls): the largest fixed r that
    meets the target in the phase's steady part (None: none does) and the fixed grid's (r, p95 / target, mean r,
    frames/s) there."""
    sim = scenario.sim_config(seed)
    spans = [(start + STEADY_AFTER_S, end) for _, start, end in scenario.spans()]

    def run(r: int) -> list[tuple[float, float, float]]:
        trace = simulate(list(scenario.phases), scenario.duration_s, fixed_decider(r), sim)
        return [phase_stats(trace, start, end, scenario.target_s) for start, end in spans]

    grid = {r: run(r) for r in FIXED_GRID}
    out = []
    for i in range(len(spans)):
        tried = {r: stats[i] for r, stats in grid.items()}
        meets = [r for r, (p95, _, _) in tried.items() if p95 <= 1.0]
        fails = [r for r, (p95, _, _) in tried.items() if p95 > 1.0 and r > max(meets, default=0)]
        low, high = max(meets, default=MIN_TOKENS - 1), min(fails, default=sim.num_patches + 1) - 1
        while low < high:  # bisection within the grid's bracket: the p95 grows with r
            mid = (low + high + 1) // 2
            tried[mid] = run(mid)[i]
            low, high = (mid, high) if tried[mid][0] <= 1.0 else (low, mid - 1)
        out.append({"best": low if low >= MIN_TOKENS else None, "grid": [(r, *tried[r]) for r in sorted(tried)]})
    return out


def run_auto(scenario: Scenario, seed: int, baseline: dict, overrides: dict) -> dict:
    """One auto run: its target metrics against the fixed baseline of the same seed."""
    sim = scenario.sim_config(seed)
    controller = new_controller(scenario.target_s, sim, warm=True, min_tokens=MIN_TOKENS, **overrides)
    trace = simulate(list(scenario.phases), scenario.duration_s, controller_decider(controller), sim)
    p95s, feasible, ratios, constrained, settles, r_settles, dominated, fps = [], [], [], [], [], [], [], []
    for (_, start, end), base in zip(scenario.spans(), baseline, strict=True):
        p95, mean_r, served = phase_stats(trace, start + STEADY_AFTER_S, end, scenario.target_s)
        fps.append(served)
        p95s.append(p95)
        feasible.append(base["best"] is not None)
        if base["best"] is not None:  # the budget and settling targets where some r meets the target
            ratios.append(mean_r / base["best"])
            constrained.append(base["best"] < sim.num_patches)
            if start > 0:
                settles.append(trace.recovery_time(start, end, scenario.target_s))
                r_settles.append(trace.budget_settle_time(start, end))
        # a fixed r that serves more frames at a p95 no higher (to 1 %): by how much more (0: none)
        better = [f / served - 1 for _, p, _, f in base["grid"] if p <= 1.01 * p95 and f > served]
        dominated.append(max(better, default=0.0) if served > 0 else 1.0)
    return {
        "p95_over": max(0.0, max([p for p, f in zip(p95s, feasible, strict=True) if f], default=0.0) - 1.0),
        "settle_s": max(settles, default=0.0),
        # where the full budget meets the target r cannot pass the best: those phases count only when short of it
        "r_short": 1 - min([r for r, c in zip(ratios, constrained, strict=True) if c or r < 1], default=1.0),
        "dominated": max(dominated),
        "p95": p95s, "feasible": feasible, "r_vs_best": ratios, "settles_s": settles, "r_settles_s": r_settles,
        "fps": fps,
        "holds": (max([p for p, f in zip(p95s, feasible, strict=True) if f], default=0.0) <= 1.1
                  and max(settles, default=0.0) <= 2.0
                  and min(ratios, default=1.0) >= 0.9 and max(dominated) <= DOMINANCE_MARGIN),
    }


def _job(args: tuple) -> tuple:
    scenario, seed, variant, overrides, baseline = args
    return scenario, seed, variant, run_auto(scenario, seed, baseline, overrides)


def _baseline_job(args: tuple) -> tuple:
    scenario, seed = args
    return scenario, seed, fixed_baseline(scenario, seed)


def with_and_without(name: str, base: dict) -> tuple[bool, dict]:
    """Whether the mechanism is on in the base settings, and the settings with it flipped."""
    on, off = MECHANISMS[name]
    config = ControllerConfig(target_s=1.0, num_patches=196, **base)
    is_on = all(getattr(config, k) == v for k, v in on.items())
    return is_on, base | (off if is_on else on)


def run_ablation(seeds: int, mechanisms: list[str] | None = None, scenarios=SCENARIOS, base: dict | None = None,
                 jobs: int = 1, progress: Callable[[str], None] = lambda line: None) -> dict:
    """Every scenario x seed with the settings as given (base: overrides of the defaults), and with each mechanism
    flipped in turn (off where it is on, on where it is off)."""
    base, mechanisms = base or {}, list(MECHANISMS) if mechanisms is None else mechanisms
    pool = ProcessPoolExecutor(jobs) if jobs > 1 else None
    mapper = pool.map if pool else map
    started = time.monotonic()
    baselines = {(s, seed): b for s, seed, b in mapper(_baseline_job, [(s, seed) for s in scenarios
                                                                         for seed in range(seeds)])}
    progress(f"fixed baselines: {time.monotonic() - started:.0f} s")
    flips = {name: with_and_without(name, base) for name in mechanisms}
    variants = {"base": base} | {name: flipped for name, (_, flipped) in flips.items()}
    work = [(s, seed, variant, overrides, baselines[s, seed])
            for s in scenarios for seed in range(seeds) for variant, overrides in variants.items()]
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for scenario, seed, variant, result in mapper(_job, work):
        runs.setdefault((scenario.profile, scenario.name, variant), []).append({"seed": seed} | result)
    progress(f"auto runs: {time.monotonic() - started:.0f} s")
    if pool:
        pool.shutdown()
    baseline_out = {f"{s.profile}/{s.name}/{seed}": b for (s, seed), b in baselines.items()}
    return {"seeds": seeds, "scenarios": [asdict(s) for s in scenarios], "base": base,
            "on_in_base": {name: is_on for name, (is_on, _) in flips.items()},
            "runs": {"/".join(k): v for k, v in runs.items()}, "baselines": baseline_out,
            "verdicts": verdicts(runs, {name: is_on for name, (is_on, _) in flips.items()}, scenarios)}


def _spread(values: list[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def verdicts(runs: dict, on_in_base: dict[str, bool], scenarios) -> dict:
    """Per mechanism, scenario and target metric: the medians with and without it, and the change its absence makes,
    seed by seed (the same timeline both ways; > 0: worse without it): its median against its spread over the seeds
    (the std, at least the metric's rounding). It helps where its absence is worse by more than that, hurts where
    better by more; it earns its place where it helps on one profile and does not hurt the other."""
    out = {}
    for name, is_on in on_in_base.items():
        rows, changed = {}, {}
        for s in scenarios:
            base, flipped = runs[(s.profile, s.name, "base")], runs[(s.profile, s.name, name)]
            key = f"{s.profile}"
            changed.setdefault(key, [0, 0])
            changed[key][0] += sum(a != b for a, b in zip(base, flipped, strict=True))
            changed[key][1] += len(base)
            with_it, without = (base, flipped) if is_on else (flipped, base)
            for metric, (_, least) in METRICS.items():
                deltas = [b[metric] - a[metric] for a, b in zip(with_it, without, strict=True)]
                spread = max(_spread(deltas), least)
                change = statistics.median(deltas)
                rows[f"{s.profile}/{s.name}/{metric}"] = {
                    "with": statistics.median(a[metric] for a in with_it),
                    "without": statistics.median(b[metric] for b in without),
                    "change": change, "spread": spread, "base_spread": _spread([a[metric] for a in base]),
                    "effect": "helps" if change > spread else "hurts" if change < -spread else "",
                }
        profiles = sorted({s.profile for s in scenarios})
        helps = {p: any(v["effect"] == "helps" for k, v in rows.items() if k.startswith(p + "/")) for p in profiles}
        hurts = {p: any(v["effect"] == "hurts" for k, v in rows.items() if k.startswith(p + "/")) for p in profiles}
        out[name] = {"rows": rows, "helps": helps, "hurts": hurts, "runs_changed": changed,
                     "earns_its_place": any(helps[p] and not any(hurts[q] for q in profiles if q != p)
                                            for p in profiles)}
    return out


def _cell(row: dict, metric: str, scenario: str | None = None) -> str:
    fmt = "{:.1f}" if metric == "settle_s" else "{:.2f}"
    mark = {"helps": " +", "hurts": " -", "": ""}[row["effect"]]
    where = f"{scenario} {metric}: " if scenario else ""
    return (f"{where}{fmt.format(row['with'])} / {fmt.format(row['without'])} (±{fmt.format(row['spread'])})"
            f"{mark}")


def format_table(report: dict) -> str:
    """Markdown, one row a mechanism, one column a profile: the target metric its absence moves most (relative to the
    spread), with and without it, and the verdict."""
    profiles = sorted({s["profile"] for s in report["scenarios"]})
    lines = [f"| mechanism (in base) | {' | '.join(profiles)} | verdict |",
             "| --- | " + " | ".join("---" for _ in profiles) + " | --- |"]
    for name, v in report["verdicts"].items():
        cells = []
        for profile in profiles:
            rows = [(k.split("/")[1], k.split("/")[2], row) for k, row in v["rows"].items()
                    if k.startswith(profile + "/")]
            scenario, metric, row = max(rows, key=lambda r: (abs(r[2]["change"]) / r[2]["spread"],
                                                             abs(r[2]["without"] - r[2]["with"]) / r[2]["spread"]))
            moved, total = v["runs_changed"][profile]
            cells.append(f"{_cell(row, metric, scenario)}; {moved}/{total} runs changed" if moved else
                         f"no run changed (of {total})")
        verdict = "earns its place" if v["earns_its_place"] else "no"
        state = "on" if report["on_in_base"][name] else "off"
        lines.append(f"| {name} ({state}) | {' | '.join(cells)} | {verdict} |")
    return "\n".join(lines)


def format_full_table(report: dict) -> str:
    """Markdown: every mechanism x scenario x target metric, with / without it (± spread)."""
    lines = ["| mechanism | profile/scenario | " + " | ".join(METRICS) + " |",
             "| --- | --- | " + " | ".join("---" for _ in METRICS) + " |"]
    for name, v in report["verdicts"].items():
        for i, s in enumerate(report["scenarios"]):
            cells = [_cell(v["rows"][f"{s['profile']}/{s['name']}/{m}"], m) for m in METRICS]
            lines.append(f"| {name if i == 0 else ''} | {s['profile']}/{s['name']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def format_holds(report: dict) -> str:
    """Markdown: per profile and scenario, how many seeds meet every target with the mechanisms as configured, and
    the medians of the raw figures."""
    lines = ["| profile/scenario | targets held | worst p95 / target | worst settle s (r back, s) | min r / best "
             "fixed | frames/s per phase | dominated |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in report["scenarios"]:
        runs = report["runs"][f"{s['profile']}/{s['name']}/base"]
        held = sum(r["holds"] for r in runs)
        worst = statistics.median(max(r["p95"]) for r in runs)
        settle = statistics.median(r["settle_s"] for r in runs)
        r_settle = statistics.median(max(r["r_settles_s"], default=0.0) for r in runs)
        ratios = [min(r["r_vs_best"]) for r in runs if r["r_vs_best"]]
        ratio = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "none meets"
        fps = " / ".join(f"{statistics.median(r['fps'][i] for r in runs):.0f}" for i in range(len(runs[0]["fps"])))
        dom = statistics.median(r["dominated"] for r in runs)
        lines.append(f"| {s['profile']}/{s['name']} | {held}/{len(runs)} | {worst:.2f} | {settle:.1f} "
                     f"({r_settle:.1f}) | {ratio} | {fps} | {dom:.2f} |")
    return "\n".join(lines)


def print_report(report: dict, full: bool) -> None:
    print(f"{report['seeds']} seeds; base settings: {report['base'] or 'the defaults'}\n")
    print(format_holds(report))
    print("\nPer mechanism, medians with / without it (± the std over seeds of the change its absence makes, seed by "
          "seed); + where its absence is worse by more than that, - where better.\n")
    print(format_table(report))
    if full:
        print()
        print(format_full_table(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--only", nargs="*", help="mechanisms to flip (default: all)")
    parser.add_argument("--profiles", nargs="*", default=sorted(PROFILES))
    parser.add_argument("--all-on", action="store_true", help="start from every mechanism on (as before the ablation)")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="controller settings for every run, as JSON values (e.g. knee_memory=false)")
    parser.add_argument("--full", action="store_true", help="also print every mechanism x scenario x metric")
    parser.add_argument("--json", help="write the full report here")
    parser.add_argument("--from-json", help="print the tables of a report written before, running nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        print_report(report, args.full)
        return 0
    base = (dict(ALL_ON) if args.all_on else {}) | {k: json.loads(v) for k, v in (i.split("=", 1) for i in args.set)}
    mechanisms = [k for k in MECHANISMS if not args.only or k in args.only]
    scenarios = [s for s in SCENARIOS if s.profile in args.profiles]
    report = run_ablation(args.seeds, mechanisms, scenarios, base, args.jobs,
                          progress=lambda line: print(line, file=sys.stderr, flush=True))
    print_report(report, args.full)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
