"""Run as every rank of a job (tests/test_engine.py launches it): build the Trainer from a config, which resumes
the checkpoint the config names, and write what the engine holds at that point (rank 0 writes the file):
step and loader state, the sample keys every rank gets for the rest of the epoch, every trainable parameter with its AdamW moments (full, fp32, gathered from the ZeRO-3
partitions), the momentum weights, the buffers, and the image/text embeddings of a fixed batch.

    python tests/engine_probe.py OUT.pt key=value ...
"""

import sys

import torch


def main(out: str, overrides: list[str]) -> None:
    from knowlip.config import load_config
    from knowlip.launch.local import rank_env
    from knowlip.train.trainer import Trainer

    trainer = Trainer(load_config(None, overrides), rank_env())
    engine, model = trainer.engine, trainer.model
    params, moments = {}, {}
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2 link their moments to the parameters at the first step; no step ran yet
        link()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if engine.name == "deepspeed":
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            params[name] = safe_get_full_fp32_param(p).cpu()
            moments[name] = [safe_get_full_optimizer_state(p, k).cpu() for k in ("exp_avg", "exp_avg_sq")]
        else:
            params[name] = p.detach().float().cpu()
            state = engine.optimizer.state[p]
            moments[name] = [state["exp_avg"].cpu(), state["exp_avg_sq"].cpu()]
    momentum = engine.momentum_state()
    g = torch.Generator().manual_seed(0)
    size = trainer.cfg.model.image_size
    images = torch.rand(4, trainer.cfg.model.in_channels, size, size, generator=g)
    ids = torch.randint(7, len(trainer.tokenizer), (4, 24), generator=g)
    ids[:, 0] = trainer.tokenizer.cls_token_id
    att = torch.ones_like(ids)
    model.eval()
    with torch.no_grad():
        image_feat = model.encode_image(images.to(engine.compute_dtype))[1].float()
        text_feat = model.encode_text(ids, att).float()
    loader_state = trainer.loader.state_dict()
    remaining = [key for batch in trainer.loader for key in batch["keys"]]  # the rest of the epoch, this rank
    if trainer.world_size > 1:
        import torch.distributed as dist

        parts = [None] * trainer.world_size
        dist.all_gather_object(parts, remaining)
        remaining = [key for part in parts for key in part]
    if trainer.rank == 0:
        torch.save({"remaining_keys": remaining, "step": trainer.step, "loader": loader_state, "params": params,
                    "moments": moments, "momentum": momentum,
                    "buffers": {k: v.cpu() for k, v in model.named_buffers()},
                    "inputs": (images, ids, att), "image_feat": image_feat, "text_feat": text_feat,
                    "world_size": trainer.world_size}, out)
    from knowlip.distributed import shutdown

    shutdown()  # leave the process group before exit: gloo's threads torn down at exit can abort the process


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
