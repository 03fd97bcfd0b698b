#!/usr/bin/env python3
"""Markdown tables from hack/bench/compare.sh results.

    python3 hack/bench/summarize.py OUT_DIR [OUT_DIR...]

One table per step: each phase's ops/s, p50 and p99 (ms) for each run of
each driver, in the order the runs happened, then the median of the runs.
"""
import json
import statistics
import sys
from collections import defaultdict


def load(dirs):
    runs = []
    for d in dirs:
        with open(f"{d}/results.jsonl") as f:
            runs.extend(json.loads(line) for line in f if line.strip())
    return runs


def fmt(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def table(step, runs):
    phases = []
    for r in runs:
        for p in r["phases"]:
            if p["phase"] not in phases:
                phases.append(p["phase"])
    by = defaultdict(list)  # (driver, phase) -> [phase dicts]
    for r in runs:
        for p in r["phases"]:
            by[(r["driver"], p["phase"])].append(p)
    out = [f"### {step}", "", "| phase | driver | runs | ops/s (median) | p50 ms (median) | p99 ms (median) | ops/s per run | errors |", "|---|---|---|---|---|---|---|---|"]
    for ph in phases:
        for drv in ("old", "new"):
            ps = by.get((drv, ph))
            if not ps:
                continue
            med = lambda k: statistics.median(p[k] for p in ps)
            errs = sum(sum(p["errors"].values()) for p in ps)
            per_run = " / ".join(fmt(p["ops_per_sec"]) for p in ps)
            out.append(f"| {ph} | {drv} | {len(ps)} | {fmt(med('ops_per_sec'))} | {fmt(med('p50_ms'))} | {fmt(med('p99_ms'))} | {per_run} | {errs} |")
    exits = {(r["driver"], r["exit"]) for r in runs}
    bad = [d for d, e in exits if e != 0]
    if bad:
        out.append(f"\nNon-zero exit (leftovers or unexpected errors) for: {', '.join(sorted(set(bad)))}")
    return "\n".join(out) + "\n"


def main():
    runs = load(sys.argv[1:])
    steps = []
    for r in runs:
        if r["step"] not in steps:
            steps.append(r["step"])
    for s in steps:
        print(table(s, [r for r in runs if r["step"] == s]))
        extras = [(r["driver"], r["extra"]) for r in runs if r["step"] == s and r.get("extra")]
        keys = ("clone_wall_s", "storm_s", "stats_waves", "stats_calls", "storm_probe_over_1s", "storm_publish_over_1s", "storm_unpublish_over_1s",
                "paged_s", "paged_pages", "full_s", "full_pages", "create_ratio_vs_baseline", "delete_ratio_vs_baseline",
                "driver_cpu_s", "driver_peak_rss_kib")
        for drv, e in extras:
            shown = ", ".join(f"{k} {e[k]:.3g}" if isinstance(e[k], float) else f"{k} {e[k]}" for k in keys if e.get(k) is not None)
            if shown:
                print(f"- {drv}: {shown}")
        print()


if __name__ == "__main__":
    main()
