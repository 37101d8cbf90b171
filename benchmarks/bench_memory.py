"""Peak memory of every engine under a memory budget, at GPT-2-small and GPT-2-medium shapes.

    .venv/bin/python benchmarks/bench_memory.py                 # both shapes, 3 budgets
    .venv/bin/python benchmarks/bench_memory.py --quick         # a tiny model, a smoke test
    .venv/bin/python benchmarks/bench_memory.py --json out.json # also write every number

Models are random native TransformerBridges: GPT-2 small (12 layers, 12 heads, d_model 768,
d_mlp 3072) and GPT-2 medium (24 layers, 16 heads, d_model 1024, d_mlp 4096), both with
GPT-2's 50257-token vocabulary. Prompts are random tokens whose corrupted partner differs
at two positions. What each engine runs is sized so that the whole benchmark takes a few
minutes on one CPU thread (``WORK`` below; the sizes are printed): the sizes keep every
engine's work larger than one chunk at the smallest budget, so the budget binds.

Peak memory on the CPU is the peak resident set size (``VmHWM``, reset before each call
through ``/proc/self/clear_refs``) above the resident set size just before the call, the
model already loaded, after ``malloc_trim`` returned the allocator's free pages, so that
memory freed by an earlier call cannot hide this one's, and with glibc's mmap threshold
fixed (``fixed_mmap_threshold``), so that freed blocks the heap cannot reuse do not
count. On a GPU it is ``torch.cuda.max_memory_allocated`` above the allocation before the
call. Either way it counts everything the call allocates on top of the weights: the
functional forward's own fused q/k/v, the cached runs, the chunks and the set-up
(``prepare``: the bridge's logits and the check of the functional forward against them),
all of which the budget bounds. Where the runs of every prompt do not fit, a call works
through its prompts in parts (``Prepared.parts``); the per-shape line prints what the
unsplit set-up holds and peaks at, for comparison. A call whose weights copy alone
exceeds the budget cannot be under it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would interleave with the table

import torch

import reuse_lens as rl
from reuse_lens._memory import HEADROOM, format_bytes, parse_budget
from reuse_lens.circuits.measure import CircuitEvaluator
from reuse_lens.nodes import edges_of
from reuse_lens.patching._common import prepare
from reuse_lens.tasks.task import Task

SHAPES: dict[str, dict[str, int]] = {
    "gpt2-small": dict(n_layers=12, n_heads=12, d_model=768, d_head=64, d_mlp=3072),
    "gpt2-medium": dict(n_layers=24, n_heads=16, d_model=1024, d_head=64, d_mlp=4096),
    "tiny": dict(n_layers=2, n_heads=4, d_model=64, d_head=16, d_mlp=256),
}

WORK: dict[str, dict[str, int]] = {
    # prompts x tokens per shape; activation patching patches the heads of one layer
    # (the third from last: two blocks recomputed per patch), faithfulness evaluates
    # ``circuits`` random node circuits and one edge circuit.
    "gpt2-small": dict(prompts=32, tokens=16, edge_prompts=32, circuits=4),
    "gpt2-medium": dict(prompts=16, tokens=16, edge_prompts=6, circuits=2),
    "tiny": dict(prompts=8, tokens=8, edge_prompts=8, circuits=2),
}


def build(shape: str, device: str, n_prompts: int, width: int) -> tuple[Any, Task]:
    cfg: dict[str, Any] = dict(SHAPES[shape])
    vocab = 500 if shape == "tiny" else 50257
    cfg.update(d_vocab=vocab, n_ctx=64, act_fn="gelu_new", seed=0, device=device)
    model = rl.load_model(cfg)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(1, vocab, (n_prompts, width), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 7) % (vocab - 1) + 1
    corrupted[:, width // 2] = (clean[:, width // 2] + 11) % (vocab - 1) + 1
    answers = torch.randint(1, vocab, (n_prompts, 2), generator=g)
    task = Task.from_pairs(
        model, clean.tolist(), corrupted.tolist(), answers[:, 0].tolist(), answers[:, 1].tolist()
    )
    return model, task


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"{field}:\s+(\d+)", status.read())
    assert match is not None
    return int(match.group(1))


def measure(fn: Callable[[], Any], device: str) -> tuple[Any, float, int]:
    """Run ``fn``; return its value, its seconds and its peak memory above the start, bytes."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() - base
    with contextlib.suppress(OSError):  # not glibc: freed pages may stay resident
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident set size
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return out, seconds, (_rss_kib("VmHWM") - base) * 1024


def engines(model: Any, task: Task, work: dict[str, int]) -> dict[str, Callable[[int], Any]]:
    """Each engine's call under a budget (bytes), on the benchmark's work."""
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    layer = max(0, n_layers - 3)
    heads = [f"a{layer}.h{h}" for h in range(n_heads)]
    edge_task = task.select(list(range(work["edge_prompts"])))
    g = torch.Generator().manual_seed(1)
    shape = rl.nodes.shape_of(model)
    every = [n.name for n in shape.nodes()]
    circuits = [
        [every[i] for i in torch.randperm(len(every), generator=g)[: len(every) // 3].tolist()]
        for _ in range(work["circuits"])
    ]
    graph = edges_of(shape)
    pick = torch.randperm(len(graph), generator=g)[: len(graph) // 10].tolist()
    edge_circuit = [(graph[i].sender.name, graph[i].receiver_name) for i in pick]

    def node_faith(budget: int) -> Any:
        evaluator = CircuitEvaluator(model, task, ablation="mean", memory_budget=budget)
        return evaluator.nodes(circuits)

    def edge_faith(budget: int) -> Any:
        evaluator = CircuitEvaluator(model, task, ablation="mean", memory_budget=budget)
        return evaluator.edges(edge_circuit)

    return {
        f"activation patching, {n_heads} heads of layer {layer}, mean ablation": (
            lambda b: rl.activation_patching(
                model, task, nodes=heads, ablation="mean", memory_budget=b
            )
        ),
        "path patching, every sender -> logits": (
            lambda b: rl.path_patching(model, task, memory_budget=b)
        ),
        "EAP, nodes": lambda b: rl.attribution_patching(model, task, memory_budget=b),
        f"EAP-IG, edges (5 steps, {len(edge_task)} prompts)": (
            lambda b: rl.attribution_patching(
                model, edge_task, method="eap-ig", level="edge", memory_budget=b
            )
        ),
        f"faithfulness, {work['circuits']} node circuits": node_faith,
        f"faithfulness, 1 edge circuit ({len(edge_circuit)} edges)": edge_faith,
    }


def fixed_mmap_threshold(size: int = 64 << 10) -> None:
    """Have glibc serve every allocation of ``size`` bytes or more by its own mmap, and
    return it to the system when it is freed.

    By default glibc raises that threshold each time it frees such a block (up to 32 MiB),
    so after the set-up's temporaries are freed, later tensors of a few MiB come from its
    heap, and the resident set keeps freed memory it cannot reuse: at GPT-2 small the
    set-up then peaked at 476 MiB instead of 387 MiB, and activation patching under 512 MiB
    at 535 MiB instead of 407 MiB. The benchmark measures the engines' memory, not that
    policy; the same environment variable (``MALLOC_MMAP_THRESHOLD_=65536``) does it for
    any run (docs/scale.md).
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to fix
        ctypes.CDLL("libc.so.6").mallopt(-3, size)  # M_MMAP_THRESHOLD


def weights_copy(model: Any) -> int:
    """Bytes of the functional forward's own layout of the weights (the fused q/k/v) that it
    does not share with the model's parameters: held by every engine but node EAP, and
    counted in the budget (``Weights.own_bytes``)."""
    from reuse_lens.arch.registry import extract

    return extract(model).own_bytes


def weights_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="*", default=None, help="gpt2-small gpt2-medium")
    parser.add_argument("--budgets", nargs="*", default=["512MiB", "1GiB", "2GiB"])
    parser.add_argument("--only", default=None, help="run the engines whose name has this")
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    fixed_mmap_threshold()
    shapes = args.shapes or (["tiny"] if args.quick else ["gpt2-small", "gpt2-medium"])
    budgets = [parse_budget(b) for b in args.budgets]
    if args.quick:
        budgets = [parse_budget(b) for b in ("4MiB", "64MiB")]
    rows: list[dict[str, Any]] = []
    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}, glibc mmap threshold "
        "fixed at 64 KiB\n"
    )
    print("| shape | engine | budget | peak above model | under budget | seconds |")
    print("|---|---|---:|---:|:---:|---:|")
    for shape in shapes:
        work = WORK[shape]
        model, task = build(shape, args.device, work["prompts"], work["tokens"])
        copy = weights_copy(model)
        # Warm-up: the first call's one-time allocations (kernels, caches) belong to no budget.
        # The set-up below holds the runs of every prompt (no budget): for comparison.
        rl.attribution_patching(model, task.select([0]), method="eap-ig", level="edge")
        prepared, _, setup = measure(lambda m=model, t=task: prepare(m, t, None), args.device)
        held = prepared.held_bytes
        del prepared
        print(
            f"| {shape} | weights {format_bytes(weights_bytes(model))}, functional copy "
            f"{format_bytes(copy)}, held with the runs of every prompt {format_bytes(held)}, "
            f"set-up peak {format_bytes(setup)}; {work['prompts']} prompts x "
            f"{work['tokens']} tokens | | | | |"
        )
        calls = engines(model, task, work)
        for name, call in calls.items():
            if args.only and args.only not in name:
                continue
            for budget in budgets:
                _, seconds, peak = measure(lambda c=call, b=budget: c(b), args.device)
                if peak <= budget:
                    verdict = "yes"
                elif copy > budget * (1 - HEADROOM) and not name.startswith("EAP"):
                    verdict = "no: the weights copy alone exceeds it"
                else:
                    verdict = "**no**"
                row = dict(
                    shape=shape,
                    engine=name,
                    budget=budget,
                    peak=peak,
                    held=held,
                    weights_copy=copy,
                    seconds=seconds,
                    weights=weights_bytes(model),
                )
                rows.append(row)
                print(
                    f"| {shape} | {name} | {format_bytes(budget)} | {format_bytes(peak)} | "
                    f"{verdict} | {seconds:.1f} |",
                    flush=True,
                )
        del calls
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
