"""Faithfulness of many circuits: the functional ablation engine against hooks, in one run.

    .venv/bin/python benchmarks/bench_circuits.py            # GPT-2-small-sized model
    .venv/bin/python benchmarks/bench_circuits.py --quick    # a tiny model, a smoke test

Faithfulness curves, random baselines and the automatic size rule each evaluate many
circuits on one task. reuse_lens stacks them (and the prompts) along the batch of its
functional forward pass; the baseline is the same ablation through ``run_with_hooks`` on
the bridge (the library's fallback for models the fast forward does not cover), one
circuit per pass. Both ablate with the task's mean activations and must agree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_patching import Meter, build, report

from reuse_lens.nodes import shape_of
from reuse_lens.patching.ablation import AblationRunner, NodeMask


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--circuits", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, task = build(args.quick, args.prompts, args.seed)
    shape = shape_of(model)
    gen = torch.Generator().manual_seed(args.seed)
    masks = [
        NodeMask(
            torch.rand(shape.n_layers, shape.n_heads, generator=gen) < 0.3,
            torch.rand(shape.n_layers, generator=gen) < 0.5,
        )
        for _ in range(args.circuits)
    ]
    meter = Meter(str(model.cfg.device))
    fast = AblationRunner(model, task, ablation="mean")
    slow = AblationRunner(model, task, ablation="mean", engine="hooks")
    ours, t_ours, p_ours = meter(lambda: fast.nodes(masks))
    theirs, t_theirs, p_theirs = meter(lambda: slow.nodes(masks))
    diff = float((ours - theirs).abs().max())
    report(
        f"{args.circuits} node circuits, {args.prompts} prompts", t_ours, t_theirs, diff,
        (p_ours, p_theirs), "baseline: run_with_hooks, one circuit per pass",
    )  # fmt: skip


if __name__ == "__main__":
    main()
