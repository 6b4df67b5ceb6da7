"""One training step through the engine: samples/s, TFLOP/s, MFU, and where the step's time goes.

    .venv/bin/python bench/train_step.py                  # CPU: tiny, ZeRO-3 and ZeRO-2 (1 rank) vs plain
    python bench/train_step.py --gpu --out FILE           # GPU: base, bf16, the grid below

GPU grid (one child process per group, so an out-of-memory or a compiler failure costs one group only, and a
deadline that skips what no longer fits): `base` at 224 px and 512 px, plain step and DeepSpeed ZeRO-3 (one
rank), activation checkpointing off and on, eager and torch.compile (each transformer block, as
train.compile does), at the largest batch that fits (the first eager group of an image size searches upward until
of memory; the other cases reuse its batches). MFU is reported against the card's spec bf16 peak and against
its measured ceiling (an 8192^3 bf16 matmul in the same run); peak memory from the caching allocator. The
plain 224 px group also writes a torch.profiler table of the top CUDA kernels (--profile-out).

Random inputs of the real shapes (no loader: this measures the step; captions padded to 75-100% of the text
length, so the padded attention path runs). Each case runs warm-up steps, then times --steps steps and
reports the median. `optimizer_share` is the share of step time in the engine's
optimiser step (ZeRO-3: gradient partition bookkeeping, AdamW, re-partitioning); `zero_gather_share` the share
spent in ZeRO-3's parameter fetches (PartitionedParameterCoordinator.fetch_sub_module: all-gathers and their
waits); `python_calls_per_step` the Python function calls of one step under cProfile (the host work that
left an H100 idle under ZeRO-3). Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import pstats
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_io import JsonLines  # noqa: E402
from knowlip.config import load_config  # noqa: E402
from knowlip.launch.local import RankEnv, free_port  # noqa: E402
from knowlip.model.dims import preset  # noqa: E402
from knowlip.model.flops import peak_flops, training_flops_per_sample  # noqa: E402
from knowlip.model.sar_knowlip import SarKnowLIP, SpecialTokens  # noqa: E402
from knowlip.distributed import init_process_group  # noqa: E402
from knowlip.train.engine import build_engine  # noqa: E402

VOCAB = {"tiny": 4096, "base": 30524}  # tiny: as bench/model_step.py; base: bert-base + [ENC] [DEC]


class _Timer:
    """Wall time inside a wrapped callable, synchronising the GPU around it."""

    def __init__(self, device: torch.device):
        self.device, self.total, self.calls = device, 0.0, 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            self.calls += 1
            self._sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.total += time.perf_counter() - start
        return timed

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _gather_timer(device: torch.device) -> _Timer:
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

    timer = _Timer(device)
    cls = ppc.PartitionedParameterCoordinator
    if not hasattr(cls, "_knowlip_original_fetch"):
        cls._knowlip_original_fetch = cls.fetch_sub_module
    cls.fetch_sub_module = timer.wrap(cls._knowlip_original_fetch)
    return timer



# Candidate batches, searched upward (activation checkpointing reached 512 and 96 on an H100 with room to spare).
emit = JsonLines()  # --out sets its file
GPU_BATCHES = {224: [32, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768, 1024],
               512: [8, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256]}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def build(engine_name: str, size: str, image_size: int, batch: int, text_len: int, device: torch.device,
          bf16: bool, compile_blocks: bool = False, overrides: tuple[str, ...] = ()):
    """(engine, dims, vocab) of a fresh model, built as the trainer builds it (`overrides` may set
    train.precision=bf16_weights: the plain engine's bf16 weights with float32 masters)."""
    cfg = load_config(None, [f"train.engine={engine_name}", f"model.size={size}", f"model.image_size={image_size}",
                             f"data.batch_size={batch}", f"data.max_text_len={text_len}", "train.grad_clip=1.0",
                             "train.zero_stage=3", *overrides])  # "deepspeed" here means ZeRO-3 unless overridden
    torch.manual_seed(0)
    dims = preset(size, image_size=image_size)
    vocab = VOCAB[size]
    model = SarKnowLIP(dims, vocab, SpecialTokens(0, 2, 3, 4, 5, 6), attention_backend="auto")
    if compile_blocks:
        for block in [*model.vision.blocks, *model.text.layers]:
            block.compile()
    engine = build_engine(model, cfg, device, bf16, accumulation=1)
    if getattr(engine, "config", {}).get("compile", {}).get("deepcompile"):  # --override deepspeed.compile.deepcompile=true
        engine.engine.compile()  # DeepCompile (CUDA only): ZeRO-3's gathers scheduled in the compiled graph, no hooks
    return engine, dims, vocab


def random_batch(batch: int, image_size: int, text_len: int, vocab: int, device: torch.device, dtype, padded: bool):
    gen = torch.Generator().manual_seed(batch)
    images = torch.rand(batch, 1, image_size, image_size, generator=gen).to(device, dtype)
    ids = torch.randint(7, vocab, (batch, text_len), generator=gen)
    ids[:, 0] = 2
    att = torch.ones(batch, text_len, dtype=torch.long)
    if padded:
        lengths = torch.randint(int(text_len * 0.75), text_len + 1, (batch,), generator=gen)
        att = (torch.arange(text_len)[None, :] < lengths[:, None]).long()
    kw = torch.rand(batch, text_len, generator=gen) < 0.3
    return images, ids.to(device), att.to(device), kw.to(device)


def timed_steps(engine, inputs, steps: int, warmup: int, device: torch.device, step_fn=None) -> list[float]:
    """Wall time of each of `steps` full training steps after `warmup` untimed ones (GPU synchronised)."""
    step_fn = step_fn or engine.step
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        engine.momentum_update()
        out = engine.forward(*inputs, alpha=0.4)
        engine.backward(out["loss"])
        step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def throughput(dims, vocab, image_size, text_len, batch, median, peak, ceiling=None) -> dict:
    flops = training_flops_per_sample(dims, vocab, image_size, text_len, 1, batch, dims.queue_size)
    achieved = flops * batch / median
    return {"median_step_s": round(median, 4), "samples_per_s": round(batch / median, 1),
            "tflops_per_s": round(achieved / 1e12, 4), "mfu": round(achieved / peak, 4) if peak else None,
            "mfu_vs_ceiling": round(achieved / ceiling, 4) if ceiling else None}


def run_case(engine_name: str, size: str, image_size: int, batch: int, text_len: int, steps: int,
             device: torch.device, bf16: bool, zero_stage: int | None = None, gather: str = "block") -> dict:
    """CPU mode: one engine at one batch, with the shares of optimiser and ZeRO-3 gather time, the Python calls
    of one step and (ZeRO-3) its parameter fetches."""
    overrides = (f"train.zero_stage={zero_stage}", f"train.zero3_gather={gather}") if zero_stage else ()
    engine, dims, vocab = build(engine_name, size, image_size, batch, text_len, device, bf16, overrides=overrides)
    gathers = _gather_timer(device) if engine_name == "deepspeed" else _Timer(device)
    optimizer = _Timer(device)
    inputs = random_batch(batch, image_size, text_len, vocab, device, torch.bfloat16 if bf16 else torch.float32,
                          padded=False)
    timed_steps(engine, inputs, 0, 3, device)
    gathers.total = optimizer.total = 0.0
    gathers.calls = 0
    times = timed_steps(engine, inputs, steps, 0, device, optimizer.wrap(engine.step))
    fetches = gathers.calls // max(1, steps)
    median = sorted(times)[len(times) // 2]
    calls = pstats.Stats(profiled_step(engine, inputs, device)).total_calls
    phases = calls_by_phase(engine, inputs, device) if engine_name == "deepspeed" else None
    return {"bench": "train_step", "engine": engine_name, "preset": size, "image_size": image_size,
            "zero_stage": zero_stage, "zero3_gather": gather if zero_stage == 3 else None,
            "zero_fetches_per_step": fetches if engine_name == "deepspeed" else None,
            "batch_size": batch, "text_len": text_len, "precision": "bf16" if bf16 else "fp32",
            **throughput(dims, vocab, image_size, text_len, batch, median, peak_flops(device)),
            "optimizer_share": round(optimizer.total / sum(times), 3),
            "zero_gather_share": round(gathers.total / sum(times), 3) if engine_name == "deepspeed" else None,
            "python_calls_per_step": calls, "calls_by_phase": phases, "device": device_name(device),
            "torch": torch.__version__}


# ----------------------------------------------------------------------------------------------------------
# GPU: one group (engine x image size x compile) per child process
# ----------------------------------------------------------------------------------------------------------


def matmul_ceiling(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """bf16 FLOP/s of an n^3 matmul on random data, mean of `repeats` after 3 warm-ups."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fits(engine, inputs, device) -> bool:
    """One step at this batch; False (and memory released) on CUDA out-of-memory."""
    try:
        timed_steps(engine, inputs, 0, 1, device)
        return True
    except torch.OutOfMemoryError:
        pass
    engine.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return False


def profile_top_kernels(engine, inputs, device, path: Path, rows: int = 25) -> dict:
    """torch.profiler over 2 steps: the top ops by CUDA time and by host time, as text tables; then one step
    under cProfile (path + '.py.txt'): the Python functions by own time, which is where host overhead such as
    ZeRO-3's module hooks shows. Returns the wall and CUDA-kernel seconds of the profiled steps."""
    import io

    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed_steps(engine, inputs, 2, 0, device)
    wall = time.perf_counter() - start
    averages = prof.key_averages()
    kernels_s = sum(e.self_device_time_total for e in prof.events() if e.device_type.name == "CUDA") / 1e6
    tables = [averages.table(sort_by=key, row_limit=rows, max_name_column_width=90)
              for key in ("cuda_time_total", "self_cpu_time_total")]
    path.write_text("\n\n".join(tables))
    text = io.StringIO()
    stats = pstats.Stats(profiled_step(engine, inputs, device), stream=text)
    stats.sort_stats("tottime").print_stats(40)
    Path(str(path) + ".py.txt").write_text(text.getvalue())
    phases = calls_by_phase(engine, inputs, device) if engine.name == "deepspeed" else None
    return {"profiled_steps": 2, "wall_s": round(wall, 3), "cuda_kernels_s": round(kernels_s, 3),
            "gpu_busy_share": round(kernels_s / wall, 3), "python_calls_per_step": stats.total_calls,
            "calls_by_phase": phases}


def profiled_step(engine, inputs, device):
    """One step under cProfile: the host's Python work (ZeRO-3's module hooks show there, GPU or not)."""
    import cProfile

    py = cProfile.Profile()
    py.enable()
    timed_steps(engine, inputs, 1, 0, device)
    py.disable()
    return py


def calls_by_phase(engine, inputs, device) -> dict[str, int]:
    """The Python calls of one step by where DeepSpeed spends them, from the stack of every call: `model` (our
    code, no DeepSpeed hook on the stack), `gather` and `release` (a module's weights fetched and freed around
    its call), `hook_setup` (DeepSpeed walking a module's inputs and outputs to hang its backward hooks, its
    forward prologue and epilogue), `zero_linear` (ZeRO-3's own Linear autograd function), `reduction`
    (gradients reduced and partitioned), `optimizer_step` (the engine's step: ZeRO-3 frees every weight and
    gathers the persistent ones again), `other`. The phases sum to the step's calls under sys.setprofile."""
    counts: dict[str, int] = {}

    def phase(frame) -> str:
        names = []
        while frame is not None:
            code = frame.f_code
            if "deepspeed" in code.co_filename and code.co_name != "wrapped_fn":
                names.append(f"{Path(code.co_filename).name}:{code.co_name}")
            frame = frame.f_back
        names.reverse()  # outermost first
        if not names or names == ["engine.py:forward"]:
            return "model"
        if names[0] == "engine.py:step":
            return "optimizer_step"
        joined = " ".join(names)
        for key, name in (("coalesce_grad_reduction", "reduction"), ("reduce", "reduction"),
                          ("fetch_sub_module", "gather"), ("release", "release"), ("linear.py", "zero_linear"),
                          ("apply_to_tensors_only", "hook_setup"), ("_forward_prologue", "hook_setup"),
                          ("_forward_epilogue", "hook_setup")):
            if key in joined:
                return name
        return "model" if names[-1] in ("engine.py:forward", "engine.py:backward") else "other"

    def profile(frame, event, arg):
        if event in ("call", "c_call"):
            name = phase(frame)
            counts[name] = counts.get(name, 0) + 1

    sys.setprofile(profile)
    try:
        timed_steps(engine, inputs, 1, 0, device)
    finally:
        sys.setprofile(None)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def gpu_group(spec: dict) -> None:
    """Child process: one engine x image size x compile setting; AC off then on. Prints one JSON row per case."""
    device = torch.device(spec["device"])
    init_process_group(RankEnv(0, 1, 0, 1, "127.0.0.1", free_port()), device, "auto", 600)
    engine_name, image, text_len, size = spec["engine"], spec["image_size"], spec["text_len"], spec["preset"]
    candidates = spec["candidates"]
    batches = spec.get("batches") or {}
    first = batches.get("off") or candidates[0]
    t0 = time.perf_counter()
    overrides = tuple(spec.get("overrides") or ())
    engine, dims, vocab = build(engine_name, size, image, first, text_len, device, True, spec["compile"], overrides)
    build_s = time.perf_counter() - t0
    model = engine.module
    for ac in [ac for ac in (False, True) if spec.get("ac", "both") in ("both", "on" if ac else "off")]:
        key = "on" if ac else "off"
        model.vision.activation_checkpointing = model.text.activation_checkpointing = ac
        row = {"bench": "train_step", "engine": engine_name, "preset": size, "image_size": image,
               "text_len": text_len, "precision": "bf16", "compile": spec["compile"], "activation_checkpointing": ac,
               "overrides": list(overrides),
               "device": device_name(device), "torch": torch.__version__}
        t0 = time.perf_counter()
        if spec.get("search"):  # upward from the last batch that fitted (checkpointing only lowers memory)
            best = None
            for b in [b for b in candidates if b >= (batches.get("off") or 0)]:
                if not _fits(engine, random_batch(b, image, text_len, vocab, device, torch.bfloat16, True), device):
                    break
                best = b
            batches[key] = best
        else:  # the plain eager batch, or the next smaller one that fits (ZeRO-3 keeps more state)
            batches[key] = next((b for b in reversed(candidates) if b <= (batches.get(key) or 0) and _fits(
                engine, random_batch(b, image, text_len, vocab, device, torch.bfloat16, True), device)), None)
        batch = batches.get(key)
        if batch is None:
            row.update(error="no batch fits")
            print(json.dumps(row), flush=True)
            continue
        inputs = random_batch(batch, image, text_len, vocab, device, torch.bfloat16, True)
        first_step_s = time.perf_counter() - t0  # includes compilation when compiled
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            times = timed_steps(engine, inputs, spec["steps"], 2, device)
        except torch.OutOfMemoryError:
            row.update(batch_size=batch, error="out of memory while timing")
            print(json.dumps(row), flush=True)
            continue
        median = sorted(times)[len(times) // 2]
        row.update(batch_size=batch, **throughput(dims, vocab, image, text_len, batch, median, peak_flops(device),
                                                  spec.get("ceiling")),
                   peak_mem_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                   if device.type == "cuda" else 0.0,
                   setup_s=round(build_s + first_step_s, 1), step_spread=round((max(times) - min(times)) / median, 3))
        build_s = 0.0
        print(json.dumps(row), flush=True)
        if spec.get("profile_out") and not ac:
            busy = profile_top_kernels(engine, inputs, device, Path(spec["profile_out"]))
            print(json.dumps({**{k: row[k] for k in ("bench", "engine", "image_size", "batch_size", "overrides")},
                              "profile": spec["profile_out"], **busy}), flush=True)


GPU_PLAN = [  # (engine, image size, compile): in priority order; later ones start from the plain eager batches
    ("plain", 224, False), ("deepspeed", 224, False), ("plain", 512, False), ("deepspeed", 512, False),
    ("plain", 224, True), ("deepspeed", 224, True), ("plain", 512, True), ("deepspeed", 512, True),
]


def gpu_driver(args) -> int:
    """The GPU grid; `--dry-run-cpu` walks the same code on the CPU with `tiny` (a test of the script)."""
    deadline = time.monotonic() + args.budget_s
    dry = args.dry_run_cpu
    device = torch.device("cpu" if dry else "cuda")
    size, candidates = ("tiny", {224: [2, 4], 512: [2]}) if dry else ("base", GPU_BATCHES)
    ceiling = matmul_ceiling(device, 512 if dry else 8192)
    n = 512 if dry else 8192
    rows = [{"bench": "matmul_ceiling", "shape": f"{n}^3", "dtype": "bf16", "tflops_per_s": round(ceiling / 1e12, 1),
             "spec_tflops_per_s": (peak_flops(device) or 0) / 1e12, "device": device_name(device)}]
    emit(rows[-1])
    if not dry:
        torch.cuda.empty_cache()
    batches: dict[int, dict] = {int(k): {"off": int(v), "on": int(v)} for k, v in
                                (item.split(":") for item in args.batches.split(",") if item)}
    profiled = False  # --profile-out: the first 224 px group
    for engine_name, image, compiled in GPU_PLAN:
        if (compiled and args.eager_only) or (args.groups and
                                              f"{engine_name}/{image}/{'compile' if compiled else 'eager'}"
                                              not in args.groups.split(",")):
            continue
        left = deadline - time.monotonic()
        label = f"{engine_name}/{image}px/{'compile' if compiled else 'eager'}"
        if left < 45:
            emit({"bench": "train_step", "group": label, "skipped": f"{left:.0f} s left of --budget-s"})
            continue
        search = not compiled and image not in batches  # the first eager group of a size, unless --batches
        spec = {"ac": args.ac, "overrides": args.override, "engine": engine_name, "image_size": image, "text_len": args.text_len, "compile": compiled,
                "device": device.type, "preset": size, "candidates": candidates[image],
                "steps": args.steps, "ceiling": ceiling, "search": search, "batches": batches.get(image),
                "profile_out": str(args.profile_out) if args.profile_out and image == 224 and not profiled else None}
        profiled = profiled or bool(spec["profile_out"])
        if not search and not batches.get(image):
            emit({"bench": "train_step", "group": label, "skipped": "the eager search found no batch"})
            continue
        try:
            proc = subprocess.run([sys.executable, __file__, "--group", json.dumps(spec)], capture_output=True,
                                  text=True, timeout=left - 10)
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out, err = ((x or b"").decode() if not isinstance(x, str) else x for x in (exc.stdout, exc.stderr))
            err, rc = err + "\ntimed out", "timeout"
        group_rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        for row in group_rows:
            rows.append(row)
            emit(row)
        if search:
            batches[image] = {("on" if r["activation_checkpointing"] else "off"): r.get("batch_size")
                              for r in group_rows if "median_step_s" in r}
        if rc != 0:
            emit({"bench": "train_step", "group": label, "rc": rc, "stderr_tail": err[-1500:]})
    print_table(rows)
    return 0


def print_table(rows: list[dict]) -> None:
    print(f"{'engine':<10}{'px':>5}{'compile':>8}{'AC':>4}{'batch':>7}{'step s':>8}{'samp/s':>8}{'TFLOP/s':>9}"
          f"{'MFU':>7}{'/ceil':>7}{'mem GiB':>9}")
    for r in rows:
        if "median_step_s" in r:
            num = lambda key, width, digits: f"{r[key]:>{width}.{digits}f}" if r.get(key) is not None else f"{'-':>{width}}"
            print(f"{r['engine'] + ('+' if r.get('overrides') else ''):<10}{r['image_size']:>5}{str(r['compile'])[0]:>8}{str(r['activation_checkpointing'])[0]:>4}"
                  f"{r['batch_size']:>7}{num('median_step_s', 8, 3)}{num('samples_per_s', 8, 1)}"
                  f"{num('tflops_per_s', 9, 1)}{num('mfu', 7, 3)}{num('mfu_vs_ceiling', 7, 3)}{num('peak_mem_gib', 9, 1)}")
        elif r.get("bench") == "matmul_ceiling":
            print(f"ceiling: {r['shape']} bf16 matmul {r['tflops_per_s']} TFLOP/s (spec {r['spec_tflops_per_s']:.0f})")
        elif "error" in r or "skipped" in r or "rc" in r:
            print(f"  {r.get('group') or r.get('engine')}: {r.get('error') or r.get('skipped') or 'rc=' + str(r['rc'])}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", action="store_true", help="the GPU grid (base, bf16); prints 'no GPU' without one")
    parser.add_argument("--group", help=argparse.SUPPRESS)  # a child of --gpu
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU cases)")
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--budget-s", type=float, default=330, help="GPU grid: skip groups past this many seconds")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    parser.add_argument("--profile-out", type=Path, help="GPU: top-kernel table of the plain 224 px step")
    parser.add_argument("--dry-run-cpu", action="store_true", help="the --gpu grid's code on CPU with tiny")
    parser.add_argument("--eager-only", action="store_true", help="GPU grid without the torch.compile groups")
    parser.add_argument("--groups", default="", help="GPU grid: only these, e.g. plain/224/compile,deepspeed/224/eager")
    parser.add_argument("--ac", choices=("off", "on", "both"), default="both", help="activation checkpointing cases")
    parser.add_argument("--batches", default="", help="GPU grid: batches instead of the search, e.g. 224:128,512:64")
    parser.add_argument("--override", action="append", default=[],
                        help="config dotlist for every case, e.g. deepspeed.zero_optimization.stage3_param_persistence_threshold=1e7")
    args = parser.parse_args()
    emit.out = args.out
    if args.group:
        gpu_group(json.loads(args.group))
        return 0
    if args.dry_run_cpu:
        return gpu_driver(args)
    if args.gpu:
        if not torch.cuda.is_available():
            print("no GPU: the --gpu grid needs a CUDA device; nothing was run")
            return 0
        return gpu_driver(args)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    init_process_group(RankEnv(0, 1, 0, 1, "127.0.0.1", free_port()), device, "auto", 600)
    results = []
    # ZeRO-2 before ZeRO-3: building a ZeRO-3 engine replaces torch.nn.functional.linear for the whole process
    # (DeepSpeed's memory-efficient linear), which would count against every engine built after it
    cases = (("plain", None, "block"), ("deepspeed", 2, "block"), ("deepspeed", 3, "flat"), ("deepspeed", 3, "block"),
             ("deepspeed", 3, "module"))
    for engine_name, stage, gather in cases:
        results.append(run_case(engine_name, "tiny", 64, 16, 128, args.steps, device, bf16=False, zero_stage=stage,
                                gather=gather))
        emit(results[-1])
    plain, zero2, zero3, zero3_block, zero3_module = results
    ratio = lambda key, r: round(r[key] / plain[key], 2)
    emit({"bench": "zero_overhead", "preset": "tiny", "zero3_vs_plain": ratio("median_step_s", zero3),
          "zero3_block_vs_plain": ratio("median_step_s", zero3_block),
          "zero3_module_vs_plain": ratio("median_step_s", zero3_module), "zero2_vs_plain": ratio("median_step_s", zero2),
          "zero3_calls_vs_plain": ratio("python_calls_per_step", zero3),
          "zero3_block_calls_vs_plain": ratio("python_calls_per_step", zero3_block),
          "zero3_module_calls_vs_plain": ratio("python_calls_per_step", zero3_module),
          "zero2_calls_vs_plain": ratio("python_calls_per_step", zero2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
