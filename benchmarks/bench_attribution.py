"""Attribution patching: reuse_lens (batched) against TransformerLens 4.3, in one run.

    .venv/bin/python benchmarks/bench_attribution.py            # GPT-2-small size, 32 pairs
    .venv/bin/python benchmarks/bench_attribution.py --quick    # a small smoke run

The model is a random native TransformerBridge the size of GPT-2 small (12 layers, 12 heads,
d_model 768, d_mlp 3072, vocabulary 50257) and the task 32 random prompt pairs of 18 to 22
tokens, each with two corrupted tokens. TransformerLens's ``attribution_patch`` runs one
prompt at a time; we pass it our corrupted prompts as its "clean" ones, which turns its
denoising convention into our noising one, so its node scores must equal ours. With
``--tl-prompts N`` it runs on the first N prompts only, and its time is scaled to all of
them (said in the output).

Each run happens in a fresh process that builds the model and warms up on one prompt.
Peak memory is taken as ``bench_memory.py`` takes it: on the CPU the peak resident set
size (``VmHWM``, reset before the call) above the resident set size before it, with
glibc's mmap threshold fixed; on a GPU ``torch.cuda.max_memory_allocated`` above the
allocation before the call.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

import reuse_lens as rl
from reuse_lens.patching.attribution import attribution_patching
from reuse_lens.patching.scores import NodeScores
from reuse_lens.tasks.task import Task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The one way the benchmarks take peaks.
from bench_memory import fixed_mmap_threshold
from bench_memory import measure as measure_bytes


def measure(fn: Callable[[], Any], device: str) -> tuple[Any, float, float]:
    """Run ``fn`` once; return its result, the seconds it took and its peak memory in MiB
    (``bench_memory.measure``: the resident high-water mark on the CPU)."""
    out, seconds, peak = measure_bytes(fn, device)
    return out, seconds, peak / 2**20


def build(quick: bool, device: str, n_prompts: int) -> tuple[Any, Task]:
    cfg: dict[str, Any]
    if quick:
        cfg = dict(n_layers=4, n_heads=4, d_model=128, d_head=32, d_mlp=512, d_vocab=1000)
    else:
        cfg = dict(n_layers=12, n_heads=12, d_model=768, d_head=64, d_mlp=3072, d_vocab=50257)
    cfg.update(n_ctx=64, act_fn="gelu", seed=0, device=device)
    model = rl.load_model(cfg)
    g = torch.Generator().manual_seed(0)
    d_vocab = int(cfg["d_vocab"])
    lengths = torch.randint(18, 23, (n_prompts,), generator=g).tolist()
    clean = [torch.randint(1, d_vocab, (n,), generator=g).tolist() for n in lengths]
    corrupted = [
        [t if i not in (3, 7) else (t * 7 + 1) % d_vocab for i, t in enumerate(c)] for c in clean
    ]
    answers = torch.randint(1, d_vocab, (n_prompts,), generator=g).tolist()
    wrong = [(a + 1) % d_vocab for a in answers]
    return model, Task.from_pairs(model, clean, corrupted, answers, wrong, name="bench")


def transformer_lens_scores(model: Any, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """TL's node scores per head and MLP, summed over positions, averaged over prompts."""
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    heads, mlps = torch.zeros(n_layers, n_heads), torch.zeros(n_layers)
    device = model.cfg.device
    for i in range(len(task)):
        one = task.select([i]).to(device)
        pos = int(one.answer_pos[0])
        inputs = one.metric_inputs()

        def metric_fn(logits: torch.Tensor, pos: int = pos, inputs: Any = inputs) -> torch.Tensor:
            return task.metric(logits[:, pos].float(), inputs).sum()

        result = attribution_patch(model, one.corrupted, one.clean, metric_fn)
        for node, value in result.node_scores.items():
            if node.kind == "attn_head_out":
                heads[node.layer, node.head] += value
            elif node.kind == "mlp_out":
                mlps[node.layer] += value
    return heads / len(task), mlps / len(task)


RUNS = {
    "ours": "reuse_lens EAP, nodes (batched)",
    "tl": "TransformerLens attribution_patch, nodes (one prompt at a time)",
    "ig": "reuse_lens EAP-IG, nodes",
    "edges": "reuse_lens EAP, edges",
}


def run_one(args: argparse.Namespace, n_prompts: int) -> dict[str, Any]:
    """Build the model and task, warm up on one prompt, then time one run: ``args.only``."""
    fixed_mmap_threshold()
    model, task = build(args.quick, args.device, n_prompts)
    if args.only == "tl":
        task = task.select(list(range(min(args.tl_prompts or len(task), len(task)))))
        transformer_lens_scores(model, task.select([0]))
        fn: Callable[[], Any] = lambda: transformer_lens_scores(model, task)  # noqa: E731
    else:
        options: dict[str, Any] = {
            "ours": {},
            "ig": {"method": "eap-ig", "steps": args.steps},
            "edges": {"level": "edge"},
        }[args.only]
        attribution_patching(model, task.select([0]), **options)
        fn = lambda: attribution_patching(model, task, **options)  # noqa: E731
    out, seconds, peak = measure(fn, args.device)
    record: dict[str, Any] = {"seconds": seconds, "peak_mb": peak, "n": len(task)}
    if args.only == "tl":
        record["heads"], record["mlps"] = out
    elif args.only == "ours":
        assert isinstance(out, NodeScores)
        record["heads"], record["mlps"] = out.heads, out.mlps
        # For the comparison with a subsampled TL run: our scores on the same prompts.
        n_tl = min(args.tl_prompts or len(task), len(task))
        sub = out if n_tl == len(task) else attribution_patching(model, task.select(range(n_tl)))
        assert isinstance(sub, NodeScores)
        record["heads_tl_prompts"], record["mlps_tl_prompts"] = sub.heads, sub.mlps
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model and 8 prompts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=None, help="prompt pairs (32; 8 quick)")
    parser.add_argument(
        "--tl-prompts", type=int, default=None, help="run TL on the first N prompts only"
    )
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG steps")
    parser.add_argument("--no-edges", action="store_true", help="skip the edge-level timing")
    parser.add_argument("--only", choices=sorted(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n_prompts = args.prompts or (8 if args.quick else 32)
    if args.only:
        torch.save(run_one(args, n_prompts), args.out)
        return

    model, task = build(args.quick, args.device, n_prompts)
    print(
        f"model: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, d_model "
        f"{model.cfg.d_model}, vocab {model.cfg.d_vocab}; {len(task)} prompt pairs of "
        f"{int(task.lengths.min())}-{int(task.lengths.max())} tokens; device {args.device}; "
        f"torch threads {torch.get_num_threads()}; each run in a fresh process"
    )
    del model
    # Each run gets a fresh process, so that its peak memory is not hidden by memory an
    # earlier run left with the allocator.
    results: dict[str, dict[str, Any]] = {}
    passthrough = sys.argv[1:]
    for name in [r for r in RUNS if not (args.no_edges and r == "edges")]:
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "result.pt")
            subprocess.run(
                [sys.executable, __file__, *passthrough, "--only", name, "--out", out],
                check=True,
            )
            results[name] = torch.load(out)

    ours, tl = results["ours"], results["tl"]
    tl_scaled = tl["seconds"] * n_prompts / tl["n"]
    diff = max(
        float((ours["heads_tl_prompts"] - tl["heads"]).abs().max()),
        float((ours["mlps_tl_prompts"] - tl["mlps"]).abs().max()),
    )
    scale = float(torch.cat([tl["heads"].flatten(), tl["mlps"]]).abs().max())
    print("\n| run | seconds | peak memory (MiB) |\n|---|---|---|")
    for name, record in results.items():
        label = RUNS[name]
        seconds = record["seconds"]
        if name == "tl" and tl["n"] < n_prompts:
            label += f" [{tl['n']} of {n_prompts} prompts, time scaled]"
            seconds = tl_scaled
        if name == "ig":
            label += f" ({args.steps} steps)"
        print(f"| {label} | {seconds:.2f} | {record['peak_mb']:.0f} |")
    print(
        f"\nspeed-up of batched EAP over TransformerLens: {tl_scaled / ours['seconds']:.1f}x\n"
        f"largest |ours - TL| over node scores: {diff:.2e} (largest |score| {scale:.3g})"
    )


if __name__ == "__main__":
    main()
