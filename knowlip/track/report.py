"""The end-of-run report: loss terms, throughput and MFU as PNG plots, and the final evaluation as a table, so
that a run reads at a glance in the MLflow UI (stored under the run's `report/` artifacts)."""

from __future__ import annotations

import json
from pathlib import Path


RESUMED = "resumed_from_step"  # on the first metrics row after a resume: where the run resumed


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _plot(rows: list[dict], keys: list[str], title: str, path: Path, resumes: list[int] = ()) -> bool:
    """One panel; the legend outside the axes (it hid the total loss), dotted lines where the run resumed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    drawn = 0
    for key in keys:
        steps, values = _series(rows, key)
        if steps:
            ax.plot(steps, values, label=key, linewidth=2.2 if key == "loss" else 1.2)
            drawn += 1
    for n, step in enumerate(resumes):
        ax.axvline(step, color="grey", linestyle=":", label="resumed" if n == 0 else None)
    if drawn:
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize="small")
        fig.tight_layout()
        fig.savefig(path)
    plt.close(fig)
    return bool(drawn)


def write_report(run_dir: Path, out: Path) -> Path:
    """Plots and tables from <run_dir>/metrics.jsonl into `out`; returns `out`."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out.mkdir(parents=True, exist_ok=True)
    loss_keys = sorted({k for r in rows for k in r if k.startswith("loss")})
    resumes = sorted({int(r[RESUMED]) for r in rows if isinstance(r.get(RESUMED), (int, float))})
    _plot(rows, loss_keys, "loss terms", out / "losses.png", resumes)
    _plot(rows, ["lr"], "learning rate", out / "lr.png", resumes)
    _plot(rows, ["samples_per_s"], "throughput (samples/s, all ranks)", out / "throughput.png", resumes)
    _plot(rows, ["mfu", "data_time_share"], "MFU and data-wait share", out / "mfu.png", resumes)
    evals = next((r for r in reversed(rows) if any(k.startswith("eval_") for k in r)), None)
    lines = ["| metric | value |", "| --- | ---: |"]
    if evals:
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(evals.items())
                  if k.startswith("eval_") and isinstance(v, (int, float))]
    last = rows[-1] if rows else {}
    summary = {"steps": last.get("step"), "final_loss": last.get("loss"), "world_size": last.get("world_size"),
               "global_batch": last.get("global_batch")}
    (out / "summary.md").write_text("# Run summary\n\n" + "\n".join(f"- {k}: {v}" for k, v in summary.items())
                                    + "\n\n## Final evaluation" + (f" (step {evals['step']})\n\n" if evals else
                                                                   "\n\nno evaluation in this run\n\n")
                                    + ("\n".join(lines) + "\n" if evals else ""))
    return out
