"""Cross-model activation patching: the functional engine against the hook loop, in one run.

    .venv/bin/python benchmarks/bench_cross_model.py            # the zoo pair, and gpt2 / llama_gqa at bench size
    .venv/bin/python benchmarks/bench_cross_model.py --quick    # tiny shapes (the test tier)

Each case is a base model and a "fine-tune": for the zoo, ``zoo:wide`` and
``zoo:wide-ft-gendered_pronoun`` on 64 held-out gendered-pronoun prompts; for a family, a
random ``transformers`` model at ``bench_archs.py``'s size (4 layers, d_model 256, 8 heads)
and a copy with noise on every head and MLP matrix, on 32 prompts of 24 random tokens.
Both sides compute ``rl.cross_model_patching`` of every head and MLP (normalize=False):
``engine="functional"`` (batched, from cached runs, answer position only unembedded) and
``engine="hooks"`` (one ``run_with_hooks`` of the target bridge per node and chunk: the
loop a user would write with TransformerLens). The max abs diff compares their effects.

Each side runs in a fresh process on one torch thread: its peak resident set size, less the
size after loading the models, is its own peak memory. The call is timed ``--repeat`` times
and the fastest CPU time (``time.process_time``) is kept, as in ``bench_archs.py``.
``--json PATH`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def _pair(case: str, folder: Path, quick: bool) -> tuple[Any, Any, Any]:
    """(base, tuned, task) of one case."""
    import torch

    import reuse_lens as rl

    if case == "zoo":
        base = rl.load_model("zoo:wide")
        tuned = rl.load_model("zoo:wide-ft-gendered_pronoun")
        n = 8 if quick else 64
        return base, tuned, rl.tasks.load("gendered_pronoun", base, n=n, seed=0)
    from bench_archs import build

    if not (folder / "config.json").is_file():
        build(case, folder)
    base, tuned = rl.load_model(folder), rl.load_model(folder)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.original_model.named_parameters():
            if p.dim() == 2 and any(k in name for k in ("attn", "attention", "mlp")):
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.2)
    n, width = (4, 8) if quick else (32, 24)
    vocab = int(base.cfg.d_vocab)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(4, vocab, (n, width), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 1) % (vocab - 4) + 4
    answers = torch.randint(4, vocab, (n, 2), generator=gen)
    task = rl.Task.from_pairs(
        base, clean.tolist(), corrupted.tolist(), answers[:, 0].tolist(), answers[:, 1].tolist()
    )
    return base, tuned, task


def child(case: str, folder: Path, engine: str, repeat: int, quick: bool) -> dict[str, Any]:
    import torch

    import reuse_lens as rl

    torch.set_num_threads(1)
    base, tuned, task = _pair(case, folder, quick)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best_cpu, best_wall = float("inf"), float("inf")
    scores = None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        scores = rl.cross_model_patching(base, tuned, task, normalize=False, engine=engine)  # type: ignore[arg-type]
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    assert scores is not None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "cpu_s": best_cpu,
        "wall_s": best_wall,
        "peak_mib": max(0, peak - loaded) / 1024,
        "engine": scores.settings["engine"],
        "nodes": len(scores.as_dict()),
        "scores": scores.as_dict(),
    }


def _side(case: str, folder: Path, engine: str, repeat: int, quick: bool) -> dict[str, Any]:
    args = [sys.executable, __file__, "--child", case, str(folder), engine, str(repeat)]
    out = subprocess.run(
        [*args, *(["--quick"] if quick else [])],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["zoo", "gpt2", "llama_gqa"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, folder, engine, repeat = args.child
        print(json.dumps(child(case, Path(folder), engine, int(repeat), args.quick)))
        return 0
    repeat = 1 if args.quick else args.repeat
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            folder = Path(tmp) / case
            if case != "zoo":
                from bench_archs import build

                build(case, folder)
            fast = _side(case, folder, "functional", repeat, args.quick)
            slow = _side(case, folder, "hooks", repeat, args.quick)
            diff = max(abs(fast["scores"][k] - slow["scores"][k]) for k in fast["scores"])
            rows.append(
                {
                    "case": case,
                    "nodes": fast["nodes"],
                    "functional_s": fast["cpu_s"],
                    "hooks_s": slow["cpu_s"],
                    "ratio": slow["cpu_s"] / fast["cpu_s"],
                    "functional_peak_mib": fast["peak_mib"],
                    "hooks_peak_mib": slow["peak_mib"],
                    "max_abs_diff": diff,
                    "engines": [fast["engine"], slow["engine"]],
                }
            )
    print(f"{'case':10} {'nodes':>5} {'functional s':>12} {'hooks s':>9} {'ratio':>6} "
          f"{'peak MiB f/h':>14} {'max |diff|':>10}")  # fmt: skip
    for r in rows:
        print(f"{r['case']:10} {r['nodes']:5d} {r['functional_s']:12.2f} {r['hooks_s']:9.2f} "
              f"{r['ratio']:5.1f}x {r['functional_peak_mib']:6.0f}/{r['hooks_peak_mib']:<7.0f} "
              f"{r['max_abs_diff']:10.1e}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
