"""A scaling model: step time and efficiency of SAR-KnowLIP data-parallel training from 8 to 4,096 GPUs.

    .venv/bin/python bench/scaling_model.py [--preset base] [--plot runs/scaling.png]
    .venv/bin/python bench/scaling_model.py --cross-check      # the same formula against a 2-rank gloo run here
    nsenter --net=/var/run/netns/knowlip-node1 .venv/bin/python bench/scaling_model.py --cross-check --two-hosts
                                                               # ... one rank on each host (up.sh --nodes 2)

Inputs, all printed with the table:
- the measured single-GPU step (compute, from BENCHMARKS.md: `base` 224 px, batch 128 per GPU, one H100:
  0.411 s plain autocast step) and the measured ZeRO-3 host cost on one rank (0.94-1.00 s ZeRO-3 step vs that
  plain step: ~0.55 s of parameter-hook bookkeeping a step, which no interconnect hides), from ZeRO-3 as it
  gathered then (a module at a time, 1,770 fetches); for ZeRO-3 now (a module or a block at a time, or a block
  at a time in flat parameters, issue 26)
  that cost scaled by the Python calls of a `base` step counted on the CPU, now against then
  (bench/train_step.py's counts; computed inputs, not GPU measurements);
- parameters from the model itself (trainable P, frozen momentum copies Q);
- communication per GPU per step, ring collectives over N GPUs, bf16 on the wire:
    ZeRO-1 and ZeRO-2: gradients reduce-scattered, updated parameters all-gathered: 2 (N-1)/N * 2P bytes
    ZeRO-3: parameters all-gathered for forward (P + Q) and again for backward (P), gradients
            reduce-scattered (P): (N-1)/N * 2 (3P + Q) bytes, in one collective per fetched module
- bandwidth: NVLink within a node of 8 (collective bus bandwidth, default 360 GB/s), and between nodes the
  per-GPU network (200 or 400 Gb/s, 80% achievable); latency per collective 15 us + 5 us * log2(N);
- overlap: without, step = compute + host + communication; with, communication hides under compute except one
  bucket's worth (the first gather or the last reduce) and the host cost.
Memory per GPU (model states only, activations come on top: 61.5 GiB measured at batch 128) shows what each
stage buys: ZeRO-3 pays only when the states would not fit otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_io import JsonLines  # noqa: E402

emit = JsonLines()
GPUS = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
# `base` ZeRO-3 steps on the CPU (batch 2, one rank; bench/train_step.py's counts, BENCHMARKS.md): Python calls and
# fetches a step as ZeRO-3 gathered when the H100 measured its host cost (1,772 fetches there, 1,770 on the H100)
# and as it gathers now: a module or a block at a time, and a block at a time in flat parameters (the default)
CALLS_THEN = 1_263_662
NOW = {"module": (1_016_058, 1184), "block": (585_501, 146), "flat": (216_731, 146)}
GIB = 2**30


@dataclass
class Machine:
    name: str
    nvlink_GBps: float  # collective bus bandwidth inside a node
    network_GBps: float  # per GPU between nodes, achievable
    gpus_per_node: int = 8
    latency_s: float = 15e-6
    latency_per_log2_s: float = 5e-6

    def bandwidth(self, n: int) -> float:
        return self.nvlink_GBps * 1e9 if n <= self.gpus_per_node else self.network_GBps * 1e9

    def latency(self, n: int) -> float:
        return self.latency_s + self.latency_per_log2_s * math.log2(max(n, 2))


@dataclass
class Workload:
    trainable: int  # P
    frozen: int  # Q: momentum encoders, gathered for their forward under ZeRO-3
    compute_s: float  # one GPU's step without communication
    zero3_host_s: float  # ZeRO-3's per-step host bookkeeping (measured on one rank)
    zero3_collectives: int  # fetched modules per step (each its own all-gather)
    zero3_now: dict  # gather mode -> (host s, fetches) of ZeRO-3 now (host scaled by Python calls)
    bucket_bytes: float = 5e8  # ZeRO-1/2 gradient buckets


def comm_bytes(stage: int, w: Workload, n: int) -> float:
    """Bytes each GPU sends (= receives) per step, ring collectives, bf16."""
    ring = (n - 1) / n
    if stage in (1, 2):
        return ring * 2 * (2 * w.trainable)
    return ring * 2 * (3 * w.trainable + w.frozen)


def zero3_costs(w: Workload, gather: str) -> tuple[float, int]:
    """(host s, fetches) a step: "then" as measured on the H100, "module" and "block" now, "free" as if the hooks
    cost nothing."""
    if gather in w.zero3_now:
        return w.zero3_now[gather]
    return (0.0 if gather == "free" else w.zero3_host_s), w.zero3_collectives


def collectives(stage: int, w: Workload, gather: str = "then") -> int:
    if stage in (1, 2):
        return 2 * max(1, math.ceil(2 * w.trainable / w.bucket_bytes))
    return zero3_costs(w, gather)[1] + max(1, math.ceil(2 * w.trainable / w.bucket_bytes))


def step_time(stage: int, w: Workload, m: Machine, n: int, overlap: bool, gather: str = "then") -> dict:
    comm = comm_bytes(stage, w, n) / m.bandwidth(n) + collectives(stage, w, gather) * m.latency(n)
    host = zero3_costs(w, gather)[0] if stage == 3 else 0.0
    if overlap:
        exposed = comm / collectives(stage, w, gather)  # one collective's worth cannot hide
        step = host + max(w.compute_s, comm) + exposed
    else:
        step = host + w.compute_s + comm
    return {"step_s": step, "comm_s": comm, "efficiency": w.compute_s / step}


def state_gib(stage: int, w: Workload, n: int, gather: str = "then") -> float:
    """Model states per GPU: the package's memory model (knowlip.train.memory_model, what zero_stage=auto uses)."""
    from knowlip.train.memory_model import state_bytes

    return state_bytes(stage, w.trainable, w.frozen, n, block_gather=gather in ("block", "flat")) / GIB


def workload(preset_name: str, compute_s: float, zero3_host_s: float, zero3_collectives: int) -> Workload:
    from knowlip.model.dims import preset
    from knowlip.model.sar_knowlip import SarKnowLIP, SpecialTokens

    vocab = 4096 if preset_name == "tiny" else 30524
    model = SarKnowLIP(preset(preset_name), vocab, SpecialTokens(0, 2, 3, 4, 5, 6), attention_backend="sdpa")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    now = {gather: (round(zero3_host_s * calls / CALLS_THEN, 3), fetches) for gather, (calls, fetches) in NOW.items()}
    return Workload(trainable, frozen, compute_s, zero3_host_s, zero3_collectives, now)


MACHINES = [Machine("NVLink + 400 Gb/s per GPU", 360, 400 / 8 * 0.8), Machine("NVLink + 200 Gb/s per GPU", 360, 200 / 8 * 0.8)]


CASES = [("ZeRO-1", 1, "then"), ("ZeRO-2", 2, "then"), ("ZeRO-3 (as measured)", 3, "then"),
         ("ZeRO-3 now, a module at a time", 3, "module"), ("ZeRO-3 now, a block at a time", 3, "block"),
         ("ZeRO-3 now, flat blocks", 3, "flat"), ("ZeRO-3, hooks free", 3, "free")]  # the last: as if ZeRO-3's host bookkeeping cost nothing


def table(w: Workload) -> list[dict]:
    rows = []
    for m in MACHINES:
        for label, stage, gather in CASES:
            for overlap in (True, False):
                for n in GPUS:
                    r = step_time(stage, w, m, n, overlap, gather)
                    rows.append({"bench": "scaling_model", "machine": m.name, "case": label, "zero_stage": stage,
                                 "overlap": overlap, "gpus": n, "step_s": round(r["step_s"], 4),
                                 "comm_s": round(r["comm_s"], 4), "efficiency": round(r["efficiency"], 3),
                                 "states_gib": round(state_gib(stage, w, n, gather), 2)})
    return rows


def print_table(rows: list[dict], w: Workload) -> None:
    print(f"P = {w.trainable / 1e6:.1f} M trainable, Q = {w.frozen / 1e6:.1f} M frozen (momentum); compute "
          f"{w.compute_s} s/step; ZeRO-3 host {w.zero3_host_s} s/step, {w.zero3_collectives} gathers/step; now "
          + ", ".join(f"{g} {h} s/step, {f} gathers/step" for g, (h, f) in w.zero3_now.items()))
    for m in MACHINES:
        print(f"\n{m.name}: efficiency (step s) with overlap | without")
        print(f"{'GPUs':>6}" + "".join(f"{label:>32}" for label, _, _ in CASES))
        for n in GPUS:
            cells = []
            for label, _, _ in CASES:
                on, off = (next(r for r in rows if r["machine"] == m.name and r["case"] == label and
                                r["overlap"] == ov and r["gpus"] == n) for ov in (True, False))
                cells.append(f"{on['efficiency']:.2f} ({on['step_s']:.3f}) | {off['efficiency']:.2f}")
            print(f"{n:>6}" + "".join(f"{c:>32}" for c in cells))
    print("\nmodel states per GPU (GiB), N = 8 / 4096:",
          ", ".join(f"ZeRO-{s}: {state_gib(s, w, 8):.1f} / {state_gib(s, w, 4096):.2f}" for s in (1, 2, 3)),
          f"; ZeRO-3 a block at a time (block, flat): {state_gib(3, w, 8, 'block'):.1f} / "
          f"{state_gib(3, w, 4096, 'block'):.2f}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MACHINES), figsize=(13, 4.8), sharey=True)
    for ax, m in zip(axes, MACHINES):
        for (label, _, _), color, width in zip(CASES, ("tab:blue", "tab:green", "tab:red", "tab:brown", "tab:purple",
                                                          "tab:olive", "tab:orange"), (4, 2, 2, 2, 2, 2, 2)):
            for overlap, style in ((True, "-"), (False, "--")):
                pts = [r for r in rows if r["machine"] == m.name and r["case"] == label and r["overlap"] == overlap]
                ax.plot([r["gpus"] for r in pts], [r["efficiency"] for r in pts], style, color=color, linewidth=width,
                        label=f"{label}{'' if overlap else ', no overlap'}")
        ax.set_xscale("log", base=2)
        ax.set_title(m.name)
        ax.set_xlabel("GPUs")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("scaling efficiency (compute / step)")
    axes[0].legend(fontsize=7.5, ncol=2, loc="lower left")
    fig.suptitle("SAR-KnowLIP base, 224 px, batch 128 per GPU: predicted data-parallel scaling")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------------------
# Cross-check on this machine: the same formula against a measured 2-rank ZeRO-3 step over gloo
# ----------------------------------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, port: int, steps: int, out: str, master: str = "127.0.0.1") -> None:
    import torch
    import torch.distributed as dist

    import train_step as ts
    from knowlip.launch.local import RankEnv
    from knowlip.distributed import init_process_group

    torch.set_num_threads(1)
    device = torch.device("cpu")
    local = 0 if master != "127.0.0.1" else rank  # one rank per host under srun -N2
    init_process_group(RankEnv(rank, world, local, 1 if master != "127.0.0.1" else world, master, port), device,
                       "gloo", 300)
    result = {}
    if world > 1:  # gloo's bus bandwidth for an all-gather the size of the model's bf16... here fp32 weights
        x = torch.ones(4 * 2**20)
        parts = [torch.empty_like(x) for _ in range(world)]
        for _ in range(2):
            dist.all_gather(parts, x)
        t0 = time.perf_counter()
        for _ in range(5):
            dist.all_gather(parts, x)
        seconds = (time.perf_counter() - t0) / 5
        result["allgather_GBps"] = (world - 1) / world * x.numel() * 4 * world / seconds / 1e9
        t0 = time.perf_counter()
        for _ in range(20):
            dist.all_reduce(torch.ones(1))
        result["latency_s"] = (time.perf_counter() - t0) / 20
    engine, dims, vocab = ts.build("deepspeed", "tiny", 64, 8, 64, device, False)
    inputs = ts.random_batch(8, 64, 64, vocab, device, torch.float32, padded=True)
    times = ts.timed_steps(engine, inputs, steps, 2, device)
    result["step_s"] = sorted(times)[len(times) // 2]
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()


def cross_check(steps: int, two_hosts: bool = False) -> dict:
    """One gloo rank here, then two: on this host (mp.spawn), or one on each host of the two-host cluster
    (`srun -N2` from node1's namespace, cluster/local/up.sh --nodes 2); the formula against the measurement."""
    import subprocess
    import tempfile

    import torch.multiprocessing as mp

    from knowlip.launch.local import free_port

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    measured = {}
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # on the file system both hosts see
        for world in (1, 2):
            out = f"{tmp}/r{world}.json"
            if world == 2 and two_hosts:
                proc = subprocess.run(["srun", "-N2", "-n2", sys.executable, __file__, "--slurm-rank", out,
                                       "--steps", str(steps)], capture_output=True, text=True, timeout=900)
                if proc.returncode != 0:
                    raise RuntimeError(f"srun failed: {proc.stderr[-2000:]}")
            else:
                mp.spawn(_rank_main, args=(world, free_port(), steps, out), nprocs=world, join=True)
            measured[world] = json.loads(Path(out).read_text())
    one, two = measured[1], measured[2]
    w = workload("tiny", one["step_s"], 0.0, 0)
    # fp32 on the wire here (no bf16 on CPU): twice the bytes of the GPU model; one collective per fetched module
    volume = comm_bytes(3, w, 2) * 2
    fetches = _count_fetches()
    predicted = one["step_s"] + volume / (two["allgather_GBps"] * 1e9) + fetches * two["latency_s"]
    return {"bench": "scaling_cross_check", "ranks": "one on each of two hosts (veth)" if two_hosts else "2 on one host",
            "world_1_step_s": round(one["step_s"], 4),
            "world_2_step_s_measured": round(two["step_s"], 4), "world_2_step_s_predicted": round(predicted, 4),
            "gloo_allgather_GBps": round(two["allgather_GBps"], 3), "gloo_latency_ms": round(two["latency_s"] * 1e3, 3),
            "fetched_modules_per_step": fetches, "comm_MB_per_step": round(volume / 1e6, 2),
            "prediction_error": round(predicted / two["step_s"] - 1, 3)}


def slurm_rank(out: str, steps: int) -> None:
    """One rank of an `srun -N2` step: its place from Slurm, rank 0's host as the rendezvous."""
    from knowlip.launch.local import first_slurm_host

    os.environ["MASTER_ADDR"] = first_slurm_host(os.environ["SLURM_JOB_NODELIST"])
    _rank_main(int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), 29533, steps, out,
               os.environ["MASTER_ADDR"])


def _count_fetches() -> int:
    """Module calls that fetch parameters in one tiny step (each a collective under ZeRO-3): forward calls of
    modules that own parameters, counted with hooks on the plain model, times 2 for the trained ones (backward)."""
    import torch

    import train_step as ts

    model = ts.SarKnowLIP(ts.preset("tiny"), 4096, ts.SpecialTokens(0, 2, 3, 4, 5, 6), attention_backend="sdpa")
    calls = {"n": 0}

    def hook(module, *_):
        trained = any(p.requires_grad for p in module.parameters(recurse=False))
        calls["n"] += 2 if trained else 1

    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.register_forward_pre_hook(hook)
    images, ids, att, kw = ts.random_batch(8, 64, 64, 4096, torch.device("cpu"), torch.float32, padded=True)
    model(images, ids, att, kw, alpha=0.4)
    return calls["n"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="base")
    parser.add_argument("--compute-s", type=float, default=0.411, help="one GPU's step (H100, base 224 px, batch 128)")
    parser.add_argument("--zero3-host-s", type=float, default=0.55, help="ZeRO-3 host cost per step (one H100 rank)")
    parser.add_argument("--zero3-collectives", type=int, default=1770, help="fetched modules per step (cProfile)")
    parser.add_argument("--plot", type=Path, default=Path("runs/scaling_model.png"))
    parser.add_argument("--cross-check", action="store_true", help="measure 1 and 2 gloo ranks here and compare")
    parser.add_argument("--two-hosts", action="store_true",
                        help="with --cross-check: the 2 ranks on the two-host cluster (run in node1's namespace)")
    parser.add_argument("--slurm-rank", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    emit.out = args.out
    if args.slurm_rank:
        slurm_rank(args.slurm_rank, args.steps)
        return 0
    if args.cross_check:
        emit(cross_check(args.steps, args.two_hosts))
        return 0
    w = workload(args.preset, args.compute_s, args.zero3_host_s, args.zero3_collectives)
    rows = table(w)
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print_table(rows, w)
    plot(rows, args.plot)
    print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
