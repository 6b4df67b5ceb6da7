"""Sanity check that the synthetic world is learnable: train the tiny model on the quickstart data, then
measure image->text retrieval on the training chips, where a retrieved caption counts as right when its eight
clauses equal the query chip's (many chips share clause texts; the geographic clause is ignored).

    .venv/bin/python bench/tiny_retrieval.py [--steps 400]      (about 3 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from knowlip.config import load_config  # noqa: E402
from knowlip.data.loader import StreamingLoader  # noqa: E402
from knowlip.data.pack import pack  # noqa: E402
from knowlip.ops.sar_norm import normalise_batch  # noqa: E402
from knowlip.sar.synth import synthesise_from_config  # noqa: E402
from knowlip.text.caption import parse_caption  # noqa: E402
from knowlip.train.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "configs/default.yaml", [
            f"run_dir={tmp}/run", f"synth.out_dir={tmp}/scenes", f"pack.inputs=[{tmp}/scenes]",
            f"pack.out_dir={tmp}/shards", f"data.shards={tmp}/shards", f"train.steps={args.steps}",
            "train.lr=5e-4", "train.log_every=50", "model.queue_size=64"])
        synthesise_from_config(cfg)
        pack(cfg)
        trainer = Trainer(cfg)
        history = trainer.train()["history"]
        model = trainer.model.eval()
        images, texts, captions = [], [], []
        with torch.no_grad():
            for batch in StreamingLoader(cfg.data.shards, 64, drop_last=False, tokenizer=trainer.text):
                chips = normalise_batch(batch, cfg.norm, trainer.device, trainer.engine.compute_dtype)
                images.append(model.encode_image(chips)[1])
                texts.append(model.encode_text(batch["input_ids"], batch["attention_mask"]))
                captions += batch["captions"]
    keys = [parse_caption(c).without("geo").text() for c in captions]
    top = (torch.cat(images) @ torch.cat(texts).t()).topk(5, dim=1).indices.tolist()
    n = len(keys)
    r1 = sum(keys[row[0]] == keys[i] for i, row in enumerate(top)) / n
    r5 = sum(any(keys[j] == keys[i] for j in row) for i, row in enumerate(top)) / n
    chance = sum(keys.count(k) for k in keys) / n / n
    print(json.dumps({"steps": args.steps, "samples": n, "loss_first": round(history[0]["loss"], 3),
                      "loss_last": round(history[-1]["loss"], 3), "i2t_R@1": round(r1, 3), "i2t_R@5": round(r5, 3),
                      "chance_R@1": round(chance, 3)}))


if __name__ == "__main__":
    main()
