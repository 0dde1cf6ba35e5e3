"""The figures of a set of runs, per rule: each seed gives one value of each figure, and the table
shows their mean with a 95% confidence interval over the seeds (Student's t)."""

from __future__ import annotations

import math
import statistics
from typing import Sequence

from node.simulate.clients import REASONS
from node.simulate.simulation import Result

T95 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23)  # by degrees of freedom, 1 to 10


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def figures(r: Result) -> dict:
    """One run's figures, in the table's order."""
    per_thousand = 1000 / r.sessions if r.sessions else 0.0
    broken = sum(r.broken.values())
    return {
        "throughput mean": statistics.fmean(r.fractions) if r.fractions else 0.0,
        "throughput p5": percentile(r.fractions, 0.05),
        "time uncovered %": 100 * r.uncovered,
        "moves /server-h": r.moves / r.server_hours if r.server_hours else 0.0,
        "moves undone %": 100 * r.undone / r.moves if r.moves else 0.0,
        "join->last move min": statistics.fmean(r.settle_min) if r.settle_min else 0.0,
        "broken /1000": broken * per_thousand,
        **{f"  by {reason}": r.broken[reason] * per_thousand for reason in REASONS},
        "refused /1000": 1000 * r.refused / (r.sessions + r.refused) if r.sessions + r.refused else 0.0,
    }


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    t = T95[len(values) - 2] if len(values) - 1 <= len(T95) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def summary(results: Sequence[Result]) -> dict[str, dict[str, tuple[float, float]]]:
    """{rule: {figure: (mean, half-width of the 95% interval)}}, rules in the order run."""
    by_rule: dict[str, list[dict]] = {}
    for r in results:
        by_rule.setdefault(r.rule, []).append(figures(r))
    return {rule: {k: mean_ci([f[k] for f in runs]) for k in runs[0]} for rule, runs in by_rule.items()}


def paired(results: Sequence[Result], a: str = "node", b: str = "petals") -> dict[str, tuple[float, float]]:
    """{figure: (mean, half-width)} of rule a minus rule b, seed by seed: both faced the same servers
    with the same seed, so the difference is much surer than the two intervals apart suggest."""
    runs = {(r.rule, r.seed): figures(r) for r in results}
    seeds = sorted(seed for rule, seed in runs if rule == a and (b, seed) in runs)
    if not seeds:
        return {}
    return {k: mean_ci([runs[a, seed][k] - runs[b, seed][k] for seed in seeds]) for k in runs[a, seeds[0]]}


def table(results: Sequence[Result]) -> str:
    """A markdown table: a row per figure, a column per rule, and node - petals paired by seed."""
    s = summary(results)
    rules = list(s)
    difference = paired(results)
    heads = rules + (["node - petals (paired)"] if difference else [])
    lines = ["| figure | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for figure in next(iter(s.values())):
        cells = [_cell(*s[rule][figure]) for rule in rules]
        if difference:
            cells.append(_cell(*difference[figure]))
        lines.append(f"| {figure} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(mean: float, half: float) -> str:
    digits = 3 if abs(mean) < 10 else 1
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"
