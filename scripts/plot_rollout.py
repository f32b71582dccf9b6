#!/usr/bin/env python3
"""Draws a rollout measured by tests/bench_real.rs on the real kube-apiserver.

Reads target/bench/rollout-N-handovers.csv (every hand-over: seconds since the sentinels,
latency from the hand-off write to the next node's cordon, nodes waiting) and
target/bench/rollout-N-requests.csv (kube-apiserver's requests per second from its audit log:
all clients, and the agents') and writes a PNG with both over the rollout's time.

Usage: scripts/plot_rollout.py N OUT.png [DIR] [TITLE]
(DIR: where the CSV files are, target/bench by default; TITLE: added to the plot's title)
Needs matplotlib (not part of the test command's venv):
  python3 -m venv target/plot-venv && target/plot-venv/bin/pip install matplotlib==3.11.2
  target/plot-venv/bin/python scripts/plot_rollout.py 1000 docs/rollout-1000.png
"""

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main():
    if not 3 <= len(sys.argv) <= 5:
        sys.exit(__doc__)
    n, out = sys.argv[1], Path(sys.argv[2])
    bench = Path(__file__).resolve().parent.parent / "target" / "bench"
    if len(sys.argv) >= 4:
        bench = Path(sys.argv[3])
    note = f" ({sys.argv[4]})" if len(sys.argv) == 5 else ""
    hand_overs = read(bench / f"rollout-{n}-handovers.csv")
    requests = read(bench / f"rollout-{n}-requests.csv")
    if not hand_overs or not requests:
        sys.exit(f"no data in {bench} for {n} nodes: run the benchmark first")

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 6.5))
    top.scatter(
        [float(h["seconds"]) for h in hand_overs],
        [float(h["handover_ms"]) for h in hand_overs],
        s=6,
        label="hand-over (hand-off write → next cordon)",
    )
    top.set_yscale("log")
    top.set_ylabel("hand-over latency (ms)")
    waiting = top.twinx()
    waiting.plot(
        [float(h["seconds"]) for h in hand_overs],
        [int(h["waiting"]) for h in hand_overs],
        color="tab:gray",
        linewidth=1,
        label="nodes waiting",
    )
    waiting.set_ylabel("nodes waiting")
    top.legend(loc="upper right", fontsize=8)
    top.set_title(f"kreboot rollout of {n} KWOK nodes on a real kube-apiserver{note}")

    seconds = [int(r["second"]) for r in requests]
    bottom.plot(seconds, [int(r["requests_all"]) for r in requests], linewidth=1, label="all clients")
    bottom.plot(seconds, [int(r["requests_agents"]) for r in requests], linewidth=1, label="kreboot agents")
    bottom.set_yscale("symlog")
    bottom.set_ylabel("kube-apiserver requests/s (audit)")
    bottom.set_xlabel("seconds since every sentinel was set")
    bottom.legend(loc="upper right", fontsize=8)

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
