"""All-position head activation patching per architecture family, against TransformerLens.

    .venv/bin/python benchmarks/bench_archs.py                 # gpt2, llama_gqa, gpt_neox, gemma2
    .venv/bin/python benchmarks/bench_archs.py --archs gemma3 mixtral qwen3_moe   # others
    .venv/bin/python benchmarks/bench_archs.py --archs qwen3 phi3 gptj   # other families

Each family is a random ``transformers`` model (``tests/archs.py``'s configs) resized
to 4 layers, d_model 256, 8 query heads of 32 (2 key/value heads where the family has
grouped-query attention) and an MLP of 1024, with a tokenizer made from 1000 words (104
tokens). The task is 32 prompts of 24 random tokens, each corrupted at two positions. reuse_lens runs
``activation_patching(nodes="heads", direction="denoising")`` end to end (including its
check of the functional logits against the bridge's); TransformerLens runs
``get_act_patch_attn_head_out_all_pos`` (including its clean cache). TL's value is our
effect plus the corrupted baseline; the max abs diff compares the two.

Each side runs in a fresh process on one torch thread, so its peak resident set size
(minus the size after loading the model) is that side's own peak memory. One untimed call
pays the one-time costs (lazy imports, rotary tables, allocator warm-up) that are not part
of the sweep; then the call is timed ``--repeat`` times (default 5) and the **median** is
kept, with the spread (the fastest and slowest call) beside it. The ratios use the
process's CPU time (``time.process_time``; one thread, so it is the time the process
actually ran), not wall-clock time, which on a shared machine also counts the time other
jobs held the core and moved the ratio by up to 1.6x between runs; both are kept in the
JSON. The ratio's spread is the slowest TransformerLens call over our fastest, and the
fastest over our slowest.

FLOPs: after the timed calls, in the same process, the same call runs once more (on a fresh
``Task`` with the same tokens, so that nothing cached on the task is reused) under
``torch.utils.flop_counter.FlopCounterMode``. TransformerLens's count is its **full**
sweep, clean cache included, exactly what is timed (this script never subsets TL's
patches). On a CPU the sweep is matmul-bound, so TL FLOPs / our FLOPs is the ceiling of the
time ratio, and efficiency = time ratio / FLOP ratio. Both sides' matmuls reach the
counter as ``aten.mm``, ``aten.addmm`` and ``aten.bmm`` (``einsum``, ``F.linear`` and
``matmul`` decompose into them; neither side calls ``scaled_dot_product_attention`` here).
The counted call also records every aten op, and any matmul-like op that the counter has
no formula for (for example ``_scaled_dot_product_flash_attention_for_cpu``) is reported
in the ``uncounted`` column, so that a biased ratio cannot pass unnoticed. Elementwise work
(norms, softmax, rotary, masking, soft caps) counts zero FLOPs on both sides.

``--json PATH`` also writes every number, per family, to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARCHS = ("gpt2", "llama_gqa", "gpt_neox", "gemma2")
SIZE = dict(d_model=256, n_layers=4, n_heads=8, n_kv=2, d_mlp=1024)
N_PROMPTS, WIDTH = 32, 24


_D, _L, _H, _KV, _MLP = (
    SIZE["d_model"],
    SIZE["n_layers"],
    SIZE["n_heads"],
    SIZE["n_kv"],
    SIZE["d_mlp"],
)
_ROTARY = dict(hidden_size=_D, num_hidden_layers=_L, num_attention_heads=_H, intermediate_size=_MLP)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("GPT2Config", dict(n_embd=_D, n_layer=_L, n_head=_H, n_inner=_MLP, n_positions=128)),
    "llama_gqa": ("LlamaConfig", dict(**_ROTARY, num_key_value_heads=_KV)),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(**_ROTARY, rotary_pct=0.5, max_position_embeddings=128),
    ),
    "gemma2": (
        "Gemma2Config",
        dict(
            **_ROTARY,
            num_key_value_heads=_KV,
            head_dim=_D // _H,
            sliding_window=4,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "qwen3": ("Qwen3Config", dict(**_ROTARY, num_key_value_heads=_KV, head_dim=_D // _H)),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            **_ROTARY,
            num_key_value_heads=_KV,
            head_dim=_D // _H,
            sliding_window=4,
            layer_types=[
                "sliding_attention",
                "sliding_attention",
                "sliding_attention",
                "full_attention",
            ],
        ),
    ),
    # Mixtures of experts: 8 experts of d_mlp / 2, two a token (Mixtral: 8 of 14336,
    # two a token; Qwen3-MoE: 128 of 768, eight a token).
    "mixtral": (
        "MixtralConfig",
        dict(
            **{**_ROTARY, "intermediate_size": _MLP // 2},
            num_key_value_heads=_KV,
            num_local_experts=8,
            num_experts_per_tok=2,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            **_ROTARY,
            num_key_value_heads=_KV,
            head_dim=_D // _H,
            moe_intermediate_size=_MLP // 2,
            num_experts=8,
            num_experts_per_tok=2,
        ),
    ),
    "phi3": ("Phi3Config", dict(**_ROTARY, num_key_value_heads=_KV)),
    "gptj": ("GPTJConfig", dict(n_embd=_D, n_layer=_L, n_head=_H, n_inner=_MLP, rotary_dim=16)),
}
"""Family -> (``transformers`` config class, fields), as in ``tests/archs.py`` at this size."""


def build(name: str, folder: Path) -> None:
    """Save family ``name`` at the benchmark size, with a 1000-word tokenizer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from reuse_lens.zoo.tokenizer import tokenizer_from_texts

    class_name, fields = CONFIGS[name]
    tokenizer = tokenizer_from_texts([f" w{i}" for i in range(1000)])
    config = getattr(transformers, class_name)(
        vocab_size=len(tokenizer.get_vocab()),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **fields,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights, so that heads differ (transformers' std is 0.02)
        for param_name, p in model.named_parameters():
            if p.dim() == 2 and "norm" not in param_name and "ln" not in param_name:
                p.mul_(8.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


MATMUL_LIKE = ("mm", "matmul", "dot", "mv", "conv", "attention", "einsum", "linear", "outer")
"""Substrings of aten op names that do floating-point contractions (checked against the
counter's registry)."""


def child(folder: Path, engine: str, repeat: int) -> dict[str, Any]:
    """Timed runs, then one FLOP-counted run, of one side in this (fresh) process."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode, flop_registry
    from transformer_lens import patching as tl

    import reuse_lens as rl
    from reuse_lens.tasks.metrics import LogitDiff

    torch.set_num_threads(1)
    model = rl.load_model(folder)
    vocab = int(model.cfg.d_vocab)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(4, vocab, (N_PROMPTS, WIDTH), generator=gen)
    corrupted = clean.clone()
    for row in range(N_PROMPTS):
        early = int(torch.randint(2, 7, (1,), generator=gen))
        late = int(torch.randint(early + 2, WIDTH - 1, (1,), generator=gen))
        for pos in (early, late):
            corrupted[row, pos] = (clean[row, pos] + 1 + pos) % (vocab - 4) + 4
    answers = torch.randint(4, vocab, (N_PROMPTS, 2), generator=gen)

    def make_task() -> Any:
        return rl.Task.from_pairs(
            model,
            clean.tolist(),
            corrupted.tolist(),
            answers[:, 0].tolist(),
            answers[:, 1].tolist(),
        )

    def run(task: Any) -> tuple[list[float], str]:
        with torch.no_grad():
            if engine == "ours":
                scores = rl.activation_patching(model, task, nodes="heads", direction="denoising")
                return (scores.heads + scores.corrupted).tolist(), scores.settings["engine"]
            inputs = task.metric_inputs()
            _, cache = model.run_with_cache(task.clean)
            out = tl.get_act_patch_attn_head_out_all_pos(
                model,
                task.corrupted,
                cache,
                lambda logits: LogitDiff()(logits[:, -1].float(), inputs).mean(),
            )
            return out.float().tolist(), "transformer_lens"

    task = make_task()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(task)  # one-time costs, untimed
    times, cpu_times = [], []
    for _ in range(repeat):
        start, cpu_start = time.perf_counter(), time.process_time()
        values, used = run(task)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * scale / 2**20

    class Ops(TorchDispatchMode):
        """Every aten op called, to check that the counter sees all matmuls."""

        def __init__(self) -> None:
            super().__init__()
            self.seen: set[Any] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.seen.add(func.overloadpacket)
            return func(*args, **(kwargs or {}))

    counter, ops = FlopCounterMode(display=False), Ops()
    with counter, ops:
        run(make_task())
    uncounted = sorted(
        str(op)
        for op in ops.seen
        if op not in flop_registry and any(m in str(op).split(".")[-1] for m in MATMUL_LIKE)
    )
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {
        "seconds": statistics.median(cpu_times),
        "all_seconds": cpu_times,
        "wall_seconds": statistics.median(times),
        "all_wall_seconds": times,
        "peak_mib": peak,
        "values": values,
        "engine": used,
        "flops": int(counter.get_total_flops()),
        "flops_by_op": by_op,
        "uncounted": uncounted,
    }


def run_child(folder: Path, engine: str, repeat: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(folder), engine, str(repeat)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _spread(side: dict[str, Any]) -> str:
    """The median and, in brackets, the fastest and slowest call."""
    times = side["all_seconds"]
    return f"{side['seconds']:5.2f} ({min(times):.2f}-{max(times):.2f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS), choices=list(CONFIGS))
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per side (median kept)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], int(args.child[2]))))
        return
    import torch

    print(
        f"all-position head activation patching, {SIZE['n_layers']} layers, d_model "
        f"{SIZE['d_model']}, {N_PROMPTS} prompts x {WIDTH} tokens, 1 CPU thread, "
        f"torch {torch.__version__}, median of {args.repeat} (min-max), CPU seconds"
    )
    print(f"{'arch':12s} {'engine':10s} {'ours s':>17s} {'TL s':>17s} {'speed-up':>18s} "
          f"{'max|diff|':>9s} {'peak MiB ours/TL':>17s} {'GFLOP ours/TL':>15s} "
          f"{'FLOP ratio':>10s} {'efficiency':>10s}  uncounted")  # fmt: skip
    results: dict[str, Any] = {
        "size": SIZE,
        "prompts": N_PROMPTS,
        "width": WIDTH,
        "torch": torch.__version__,
        "repeat": args.repeat,
        "families": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.archs:
            folder = Path(tmp) / name
            build(name, folder)
            ours = run_child(folder, "ours", args.repeat)
            theirs = run_child(folder, "tl", args.repeat)
            diff = float(
                (torch.tensor(ours["values"]) - torch.tensor(theirs["values"])).abs().max()
            )
            time_ratio = theirs["seconds"] / ours["seconds"]
            ratio_spread = (
                min(theirs["all_seconds"]) / max(ours["all_seconds"]),
                max(theirs["all_seconds"]) / min(ours["all_seconds"]),
            )
            flop_ratio = theirs["flops"] / ours["flops"]
            efficiency = time_ratio / flop_ratio
            uncounted = sorted(set(ours["uncounted"]) | set(theirs["uncounted"]))
            print(
                f"{name:12s} {ours['engine']:10s} {_spread(ours)} {_spread(theirs)} "
                f"{time_ratio:5.2f}x ({ratio_spread[0]:.2f}-{ratio_spread[1]:.2f}) {diff:9.1e} "
                f"{ours['peak_mib']:8.0f} / {theirs['peak_mib']:<6.0f} "
                f"{ours['flops'] / 1e9:6.1f} / {theirs['flops'] / 1e9:<6.1f} "
                f"{flop_ratio:9.2f}x {efficiency:9.0%}  {', '.join(uncounted) or '-'}",
                flush=True,
            )
            results["families"][name] = {
                "engine": ours["engine"],
                "max_abs_diff": diff,
                "time_ratio": time_ratio,
                "time_ratio_spread": ratio_spread,
                "flop_ratio": flop_ratio,
                "efficiency": efficiency,
                "uncounted_ops": uncounted,
                **{
                    f"{side}_{key}": run[key]
                    for side, run in (("ours", ours), ("tl", theirs))
                    for key in (
                        "seconds",
                        "all_seconds",
                        "wall_seconds",
                        "all_wall_seconds",
                        "peak_mib",
                        "flops",
                        "flops_by_op",
                    )
                },
            }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
