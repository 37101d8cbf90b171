"""Where ``discover_circuit``'s time goes: the scoring pass, the size rule, the rest.

    .venv/bin/python benchmarks/bench_discovery.py                        # the zoo
    .venv/bin/python benchmarks/bench_discovery.py --model 8x8            # 8 layers x 8 heads
    .venv/bin/python benchmarks/bench_discovery.py --model gpt2-small --n 32
    .venv/bin/python benchmarks/bench_discovery.py --quick                # a smoke test

Each row is one automatic-rule discovery (``target_faithfulness`` 0.9, mean ablation) on
the IOI task, timed by stage as ``bench_study.py`` times a study: **set-up** (the
faithfulness evaluator's unablated runs and sources), **scoring** (the patching pass the
circuit is cut from), **size rule** (``select_prefix``), **faithfulness** (the circuit's
own, with its interval), **other**. The ratio is the whole call over its scoring pass,
the same patching call run on its own just before (``activation_patching`` or
``attribution_patching``, as a user would run it; the aim: about 1.5 at most). Each row
is run ``--repeat`` times (3 by default), each discovery just after its pass alone, and
gives the median of each time, and the median of the repeats' ratios with their range:
on a shared machine one run's CPU seconds move by up to a quarter. Inside
discovery, activation patching takes the evaluator's preparation instead of running the
bridge again, so its stage there can be shorter than the pass alone. The row also gives
the number of prefix sizes the rule evaluated and the size it chose.

Models: ``zoo`` is ``zoo:base`` (4 layers x 4 heads, d_model 64); ``8x8`` (8 layers x 8
heads of 32, d_model 256, MLP 1024) and ``gpt2-small`` (12 x 12 of 64, d_model 768, MLP
3072) are the zoo's base model embedded in those shapes (``bench_study.embed_zoo``): they
compute what the zoo computes, so IOI has a circuit to find, at the cost of their shape.
One torch thread; CPU seconds (``time.process_time``) with wall-clock seconds in the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_study import Stages, embed_zoo

SHAPES = {
    "8x8": dict(n_layer=8, n_head=8, n_embd=256, n_inner=1024),
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, n_inner=3072),
}
RUNS = (("activation", "node"), ("eap-ig", "node"), ("eap-ig", "edge"))


def instrument(stages: Stages, counts: dict[str, Any]) -> None:
    import reuse_lens.circuits.discovery as discovery

    try:  # where the evaluator lives since the size rule's batching
        from reuse_lens.circuits.evaluator import CircuitEvaluator
    except ImportError:  # the library before it (for a before/after comparison)
        from reuse_lens.circuits.measure import CircuitEvaluator

    stages.wrap_method(CircuitEvaluator, "__init__", "set-up")
    stages.wrap(discovery, "_score", "scoring")
    if hasattr(CircuitEvaluator, "interval"):
        stages.wrap_method(CircuitEvaluator, "interval", "faithfulness")
    else:
        stages.wrap_method(CircuitEvaluator, "__call__", "faithfulness")
    select = discovery.select_prefix

    def counted(n: int, values: Any, target: float, **options: Any) -> int:
        def seen(sizes: list[int]) -> Any:
            counts["evaluated"] += len(sizes)
            counts["passes"] += 1
            return values(sizes)

        with stages.stage("size rule"):
            chosen = select(n, seen, target, **options)
        counts["n"], counts["chosen"] = n, chosen
        return chosen

    discovery.select_prefix = counted  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", choices=("zoo", *SHAPES), default="zoo")
    parser.add_argument("--n", type=int, default=64, help="IOI prompt pairs")
    parser.add_argument("--runs", nargs="+", default=[f"{m}/{lv}" for m, lv in RUNS])
    parser.add_argument("--quick", action="store_true", help="the zoo, 16 prompts")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each row, interleaved with its pass alone"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.n, args.repeat = "zoo", 16, 1
    import torch

    torch.set_num_threads(1)
    import reuse_lens as rl

    stages, counts = Stages(), {"evaluated": 0, "passes": 0}
    instrument(stages, counts)
    with tempfile.TemporaryDirectory() as tmp:
        spec = "zoo:base" if args.model == "zoo" else embed_zoo(Path(tmp) / "m", SHAPES[args.model])
        model = rl.load_model(spec)
    task = rl.tasks.load("ioi", model, n=args.n, seed=0)
    print(f"discover_circuit on {args.model} ({model.cfg.n_layers} layers x {model.cfg.n_heads} "
          f"heads, d_model {model.cfg.d_model}), IOI x {args.n}, 1 thread, torch "
          f"{torch.__version__}; CPU seconds")  # fmt: skip
    print("| method | level | set-up | scoring | size rule | faithfulness | other | total "
          "| pass alone | total / pass | sizes evaluated (passes) | chosen of n |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    # Untimed: the first forward and backward passes of a process pay one-time costs
    # (kernels, lazy imports) that would otherwise land on the first row's pass.
    warm = task.select(list(range(min(4, len(task)))))
    rl.activation_patching(model, warm)
    rl.attribution_patching(model, warm, method="eap-ig", level="edge")
    rows = []
    for run in args.runs:
        method, level = run.split("/")
        reps = [_once(rl, model, task, method, level, stages, counts) for _ in range(args.repeat)]
        row = _median_row(reps)
        rows.append(row)
        cell, ratios = row["stages"], sorted(r["cpu"] / max(r["pass_alone"], 1e-9) for r in reps)
        spread = f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(reps) > 1 else ""
        print(f"| {method} | {level} | " + " | ".join(f"{cell[k]:.2f}" for k in cell)
              + f" | {row['cpu']:.2f} | {row['pass_alone']:.2f} | {row['ratio']:.2f}x{spread} "
              f"| {row['evaluated']} ({row['passes']}) | {row['chosen']} of {row['n']} |",
              flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "n": args.n, "rows": rows},
                                        indent=2) + "\n")  # fmt: skip


STAGE_NAMES = ("set-up", "scoring", "size rule", "faithfulness", "other")


def _once(
    rl: Any, model: Any, task: Any, method: str, level: str, stages: Stages, counts: dict[str, Any]
) -> dict[str, Any]:
    """One timed discovery, just after its scoring pass alone."""
    alone = time.process_time()
    if method == "activation":
        rl.activation_patching(model, task, ablation="mean")
    else:
        rl.attribution_patching(model, task, method=method, level=level)
    alone = time.process_time() - alone
    stages.cpu.clear()
    stages.wall.clear()
    counts.update(evaluated=0, passes=0, n=0, chosen=0)
    cpu, wall = time.process_time(), time.perf_counter()
    with stages.stage("other"):
        circuit = rl.discover_circuit(model, task, method=method, level=level)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"method": method, "level": level, "cpu": cpu, "wall": wall,
            "stages": {k: stages.cpu.get(k, 0.0) for k in STAGE_NAMES},
            "pass_alone": alone, "stages_wall": dict(stages.wall), **counts,
            "faithfulness": circuit.metadata["faithfulness"],
            "interval": circuit.metadata.get("faithfulness_interval")}  # fmt: skip


def _median_row(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each time over the repeats (the ratio: the median of each repeat's
    own), the counts and circuit of the first (every repeat finds the same)."""
    first = reps[0]
    assert all(r["chosen"] == first["chosen"] for r in reps), "a repeat chose another size"
    row = dict(first)
    for key in ("cpu", "wall", "pass_alone"):
        row[key] = statistics.median(r[key] for r in reps)
    row["stages"] = {k: statistics.median(r["stages"][k] for r in reps) for k in STAGE_NAMES}
    ratios = [r["cpu"] / max(r["pass_alone"], 1e-9) for r in reps]
    row["ratio"], row["ratios"] = statistics.median(ratios), ratios
    row["repeats"] = reps
    return row


if __name__ == "__main__":
    main()
