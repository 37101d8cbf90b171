"""reuse_lens against TransformerLens 4.3 on one GPU, at GPT-2-small and GPT-2-medium shapes.

    .venv/bin/python benchmarks/bench_gpu.py                       # on cuda, under 5 minutes
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --quick  # tiny shapes: a smoke test

In one run, for each shape (random weights; GPT-2 small: 12 layers, 12 heads, d_model 768;
GPT-2 medium: 24 layers, 16 heads, d_model 1024; both with GPT-2's 50257-token vocabulary):

- every head, all positions: ``rl.activation_patching(nodes="heads",
  direction="denoising")`` against ``transformer_lens.patching.
  get_act_patch_attn_head_out_all_pos`` (its clean cache included), the full sweep on both
  sides, values compared (TL value = our effect + the corrupted baseline);
- edges: TransformerLens 4.3's ``attribution_patch`` with ``granularity="edge"`` is its
  only edge attribution, and it is plain EAP (its ``ig_steps > 1`` raises
  NotImplementedError), one prompt at a time (as ``bench_attribution.py`` runs it). It is
  the baseline for our edge EAP (``steps=1``); our edge EAP-IG (5 steps) is timed next to
  both. Their edge sets differ in layout, so the comparison is of time and memory only;
  node EAP is compared value by value with TL's ``granularity="node"``;
- faithfulness: 20 random node circuits and one edge circuit (10% of the edges) under mean
  ablation (``CircuitEvaluator``); TransformerLens has no batched counterpart, so these
  are timed on our side only.

Times are wall-clock after one warm-up call on the first prompt; memory is
``torch.cuda.max_memory_allocated`` above the allocation before the call (on the CPU, the
peak resident set size above the start, as ``bench_memory.py`` measures it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from transformer_lens import patching as tl_patching

import reuse_lens as rl
from reuse_lens.circuits.measure import CircuitEvaluator
from reuse_lens.nodes import edges_of, shape_of
from reuse_lens.tasks.metrics import LogitDiff
from reuse_lens.tasks.task import Task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The one way the benchmarks take peaks, and the shapes and random tasks they share.
from bench_memory import build, measure


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, float, float]:
    """``fn``'s value, seconds and peak memory in MiB, after a warm-up call."""
    out, seconds, peak = measure(fn, device)
    return out, seconds, peak / 2**20


def tl_heads(model: Any, task: Task) -> torch.Tensor:
    device = model.cfg.device
    inputs = task.to(device).metric_inputs()

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return LogitDiff()(logits[:, -1].float(), inputs).mean()

    _, cache = model.run_with_cache(task.clean.to(device))
    return tl_patching.get_act_patch_attn_head_out_all_pos(
        model, task.corrupted.to(device), cache, metric
    )


def tl_attribution(model: Any, task: Task, granularity: str) -> Any:
    from transformer_lens.tools.analysis.attribution_patching import (
        EdgeAttributionConfig,
        attribution_patch,
    )

    config = EdgeAttributionConfig(granularity=granularity)  # type: ignore[arg-type]
    device = model.cfg.device
    results = []
    for i in range(len(task)):
        one = task.select([i]).to(device)
        pos, inputs = int(one.answer_pos[0]), one.metric_inputs()

        def metric_fn(logits: torch.Tensor, pos: int = pos, inputs: Any = inputs) -> torch.Tensor:
            return task.metric(logits[:, pos].float(), inputs).sum()

        # Our corrupted prompts as its "clean": its denoising convention becomes our noising.
        results.append(attribution_patch(model, one.corrupted, one.clean, metric_fn, config))
    return results


def tl_node_scores(model: Any, results: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    heads, mlps = torch.zeros(n_layers, n_heads), torch.zeros(n_layers)
    for result in results:
        for node, value in result.node_scores.items():
            if node.kind == "attn_head_out":
                heads[node.layer, node.head] += value
            elif node.kind == "mlp_out":
                mlps[node.layer] += value
    return heads / len(results), mlps / len(results)


def run_shape(shape: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    device = args.device
    n_prompts, width = (8, 8) if args.quick else (args.prompts, args.tokens)
    model, task = build(shape, device, n_prompts, width)
    rows: list[dict[str, Any]] = []

    def row(
        what: str,
        ours: tuple[Any, float, float],
        tl: tuple[Any, float, float] | None,
        diff: float | None = None,
    ) -> None:
        rows.append(
            dict(
                shape=shape,
                what=what,
                ours_s=ours[1],
                ours_mib=ours[2],
                tl_s=None if tl is None else tl[1],
                tl_mib=None if tl is None else tl[2],
                diff=diff,
            )
        )
        ratio = "" if tl is None else f"{tl[1] / ours[1]:.2f}x"
        tl_text = "-" if tl is None else f"{tl[1]:.2f} s / {tl[2]:.0f} MiB"
        diff_text = "" if diff is None else f"{diff:.1e}"
        print(
            f"| {shape} | {what} | {ours[1]:.2f} s / {ours[2]:.0f} MiB | {tl_text} | "
            f"{ratio} | {diff_text} |",
            flush=True,
        )

    # Every head, all positions (denoising, TL's convention).
    one = task.select([0])
    rl.activation_patching(model, one, nodes="heads", direction="denoising")
    tl_heads(model, one)
    ours = timed(
        lambda: rl.activation_patching(model, task, nodes="heads", direction="denoising"), device
    )
    theirs = timed(lambda: tl_heads(model, task), device)
    diff = float((ours[0].heads + ours[0].corrupted - theirs[0].cpu()).abs().max())
    row("activation patching, every head, all positions", ours, theirs, diff)

    # Node EAP against TL's node attribution: the values must agree.
    rl.attribution_patching(model, one)
    tl_attribution(model, one, "node")
    ours = timed(lambda: rl.attribution_patching(model, task), device)
    theirs = timed(lambda: tl_attribution(model, task, "node"), device)
    heads, mlps = tl_node_scores(model, theirs[0])
    diff = max(float((ours[0].heads - heads).abs().max()), float((ours[0].mlps - mlps).abs().max()))
    row("EAP, nodes (TL: attribution_patch, node)", ours, theirs, diff)

    # Edges: TL's edge attribution (plain EAP, a prompt at a time) is the baseline where
    # the bridge gives per-head results; a native bridge does not (use_attn_result), and
    # then TL's node attribution is, as in bench_attribution.py: the label says which.
    edge_task = task.select(list(range(min(len(task), args.edge_prompts))))
    baseline = "edge"
    try:
        tl_attribution(model, one, "edge")
    except NotImplementedError:
        baseline = "node"
    rl.attribution_patching(model, one, level="edge")
    ours = timed(lambda: rl.attribution_patching(model, edge_task, level="edge"), device)
    theirs = timed(lambda: tl_attribution(model, edge_task, baseline), device)
    label = f"TL: attribution_patch, {baseline}"
    row(f"EAP, edges, {len(edge_task)} prompts ({label})", ours, theirs)
    ig = timed(
        lambda: rl.attribution_patching(model, edge_task, method="eap-ig", level="edge"), device
    )
    row(f"EAP-IG (5 steps), edges, {len(edge_task)} prompts ({label}, EAP)", ig, theirs)

    # Faithfulness of node and edge circuits.
    graph_shape = shape_of(model)
    every = [n.name for n in graph_shape.nodes()]
    g = torch.Generator().manual_seed(1)
    circuits = [
        [every[i] for i in torch.randperm(len(every), generator=g)[: len(every) // 3].tolist()]
        for _ in range(20)
    ]
    graph = edges_of(graph_shape)
    pick = torch.randperm(len(graph), generator=g)[: len(graph) // 10].tolist()
    edge_circuit = [(graph[i].sender.name, graph[i].receiver_name) for i in pick]

    def node_faith() -> Any:
        return CircuitEvaluator(model, task, ablation="mean").nodes(circuits)

    def edge_faith() -> Any:
        return CircuitEvaluator(model, task, ablation="mean").edges(edge_circuit)

    row("faithfulness, 20 node circuits", timed(node_faith, device), None)
    row(
        f"faithfulness, 1 edge circuit ({len(edge_circuit)} edges)", timed(edge_faith, device), None
    )
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 8 prompts x 8 tokens")
    parser.add_argument("--shapes", nargs="*", default=None, help="gpt2-small gpt2-medium")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--edge-prompts", type=int, default=8, help="prompts of the edge runs")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --device cpu (and --quick for a smoke test)")
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    shapes = args.shapes or (["tiny"] if args.quick else ["gpt2-small", "gpt2-medium"])
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    start = time.perf_counter()
    print(f"device {args.device} ({name}), torch {torch.__version__}\n")
    print("| shape | run | reuse_lens (time / peak) | TransformerLens 4.3 | ratio | max abs diff |")
    print("|---|---|---:|---:|---:|---:|")
    for shape in shapes:
        run_shape(shape, args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
