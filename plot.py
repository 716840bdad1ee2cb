"""A picture of a training run: rewards, routing, expert entropy and evaluation over updates.

  python plot.py runs/train-tiny [--out runs/train-tiny/run.png]

Reads the run's metrics.jsonl (step_grpo.py writes one row per update). matplotlib is optional:
`pip install matplotlib` (requirements-plot.txt).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from config import UserError, run_command
from experts import read_jsonl

PANELS = [  # (title, [(metric key, label)])
    ("reward per step kind", [("reward_plan", "plan"), ("reward_answer", "sub-answer"), ("reward_final", "final")]),
    ("routing accuracy (sampled)", [("routing_accuracy_round1", "round 1"), ("routing_accuracy_round2", "round 2"),
                                    ("routing_accuracy_round3", "round 3")]),
    ("collapse diagnostics", [("expert_entropy", "expert entropy (nats)"), ("zero_std_groups", "zero-std groups")]),
    ("greedy evaluation (validation)", [("eval_recall", "F1-Recall"), ("eval_routing_accuracy", "routing accuracy"),
                                        ("eval_evidence_found", "evidence found")]),
]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the GRPO updates of `run_dir`'s metrics.jsonl into a PNG; returns its path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install -r requirements-plot.txt") from None
    path = Path(run_dir) / "metrics.jsonl"
    rows = [r for r in read_jsonl(path) if r.get("phase") == "grpo"]
    if not rows:
        raise UserError(f"{path} holds no GRPO update to plot")
    figure, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for axis, (title, series) in zip(axes, PANELS):
        drawn = 0
        for key, label in series:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                axis.plot(*zip(*points), marker="o" if key.startswith("eval_") else None, markersize=3, label=label)
                drawn += 1
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("update")
        if drawn:
            axis.legend(fontsize=8)
        else:  # e.g. steps mode has no routing of live trajectories
            axis.text(0.5, 0.5, "not in this run's metrics", ha="center", transform=axis.transAxes)
    figure.suptitle(str(run_dir), fontsize=10)
    figure.tight_layout()
    out = Path(out) if out else Path(run_dir) / "run.png"
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run folder (out_dir) holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="the PNG to write; default: <run>/run.png")
    args = parser.parse_args(argv)
    print(f"wrote {run_command('plot.py', lambda: plot_run(args.run, args.out))}")


if __name__ == "__main__":
    main()
