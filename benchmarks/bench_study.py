"""Where a study's time goes: ``reuse-lens study``, timed stage by stage.

    .venv/bin/python benchmarks/bench_study.py                    # the zoo: the demo's study
    .venv/bin/python benchmarks/bench_study.py --model gpt2-small --tasks ioi sva --n 32
    .venv/bin/python benchmarks/bench_study.py --quick            # a smoke test (~1 minute)

The command runs in this process (``reuse_lens.cli.main``, the local executor, one torch
thread), with a timer around each stage of the work; a stage's time is its own, without
the stages it calls, so the stages add up to the whole run:

- **load**: loading the models (``load_model``);
- **evaluation**: building the tasks and evaluating every model on every task;
- **set-up**: each faithfulness evaluator's set-up (the unablated runs and the ablation's
  sources), in discovery and in the measurements;
- **scoring**: the patching pass a discovery cuts from (activation patching, EAP, EAP-IG);
- **size rule**: the automatic rule (``select_prefix``: faithfulness of prefixes);
- **faithfulness**: the found circuit's faithfulness and its interval;
- **curves and baselines**: each circuit's faithfulness curve and random baseline;
- **resamples**: everything the bootstrap resamples of the stability ceiling do (their
  own scoring, size rule and faithfulness, listed apart in the JSON);
- **comparison**: the overlap, statistics, cross-task and cross-model measures;
- **report**: summary.json, results.md and report.html;
- **other**: what is left (the study's bookkeeping, circuit files, progress).

Times are CPU seconds of this process (``time.process_time``; one thread, so the time the
process ran, whatever else the machine did), with wall-clock seconds beside them.

``--model zoo`` (the default) runs the demo's study on ``zoo:base`` and its three
fine-tunes. ``--model gpt2-small`` runs it on **the zoo's base model embedded in GPT-2
small's shape** (12 layers, 12 heads of 64, d_model 768, MLP 3072): a GPT-2 model whose
residual stream holds the zoo's 64 channels tiled 12 times (LayerNorm's mean and variance
are then the zoo's), whose layers 0, 3, 6 and 9 are the zoo's four (its 4 heads as heads
0 to 3, widened to 64 channels with the attention scale kept; its 256 MLP units as the
first 256), and whose other heads, MLP units and layers write nothing. It computes exactly
what the zoo computes, so it does the zoo's tasks, at GPT-2 small's cost: a study on it has
circuits to find, which a random model of that shape does not (every task is refused).
Its vocabulary is the zoo's (976 tokens).

``--json PATH`` also writes every number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

STAGES = (
    "load",
    "evaluation",
    "set-up",
    "scoring",
    "size rule",
    "faithfulness",
    "curves and baselines",
    "resamples",
    "comparison",
    "report",
    "other",
)


class Stages:
    """Exclusive CPU and wall time per stage: a stage entered inside another pauses it.

    Inside a bootstrap resample every stage is booked as ``resamples/<stage>``.
    """

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[Any]] = []  # [label, cpu start, wall start]

    def _now(self) -> tuple[float, float]:
        return time.process_time(), time.perf_counter()

    def _book(self) -> None:
        cpu, wall = self._now()
        if self._stack:
            top = self._stack[-1]
            self.cpu[top[0]] += cpu - top[1]
            self.wall[top[0]] += wall - top[2]
            top[1], top[2] = cpu, wall

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        inside = [frame[0] for frame in self._stack]
        label = name
        if name != "resamples" and "resamples" in inside:
            label = f"resamples/{name}"
        self._book()
        self._stack.append([label, *self._now()])
        self.calls[label] += 1
        try:
            yield
        finally:
            self._book()
            self._stack.pop()
            if self._stack:  # the enclosing stage resumes now
                self._stack[-1][1:] = self._now()

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        """Time every call of ``owner.attr`` as stage ``name``."""
        original = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)

    def wrap_method(self, cls: type, attr: str, name: str) -> None:
        original = getattr(cls, attr)
        stages = self

        def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            with stages.stage(name):
                return original(self, *args, **kwargs)

        setattr(cls, attr, timed)


def instrument(stages: Stages) -> None:
    """Put a timer around each stage of the study's work."""
    import reuse_lens.circuits.discovery as discovery
    import reuse_lens.circuits.measure as measure
    import reuse_lens.models as models
    import reuse_lens.report as report
    import reuse_lens.report.summary as summary
    import reuse_lens.study as study
    import reuse_lens.study.run as run
    import reuse_lens.study.units as units

    try:  # where the evaluator lives since the size rule's batching
        from reuse_lens.circuits.evaluator import CircuitEvaluator
    except ImportError:  # the library before it (for a before/after comparison)
        from reuse_lens.circuits.measure import CircuitEvaluator

    stages.wrap(models, "load_model", "load")
    stages.wrap(run, "_evaluations", "evaluation")
    stages.wrap_method(units.Models, "task", "evaluation")
    stages.wrap_method(CircuitEvaluator, "__init__", "set-up")
    stages.wrap(discovery, "_score", "scoring")
    stages.wrap(discovery, "path_patching", "scoring")
    stages.wrap(discovery, "select_prefix", "size rule")
    faithfulness = "interval" if hasattr(CircuitEvaluator, "interval") else "__call__"
    stages.wrap_method(CircuitEvaluator, faithfulness, "faithfulness")
    stages.wrap(measure, "faithfulness_curve", "curves and baselines")
    stages.wrap(measure, "random_baseline", "curves and baselines")
    stages.wrap_method(units.Resample, "run", "resamples")
    stages.wrap(run, "compare_circuits", "comparison")
    stages.wrap(study, "save_summary", "report")
    stages.wrap(summary, "write_markdown", "report")
    stages.wrap(report, "write", "report")


# ---- the zoo at GPT-2 small's shape ------------------------------------------------------------

GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, n_inner=3072)


def embed_zoo(folder: Path, shape: dict[str, int] = GPT2_SMALL) -> Path:
    """Save the zoo's base model embedded in a larger GPT-2 shape (GPT-2 small's by
    default; see the module's docstring) with the zoo's tokenizer, as a folder
    ``reuse-lens study`` loads. ``shape`` gives ``n_layer``, ``n_head``, ``n_embd`` and
    ``n_inner``, at least the zoo's, ``n_embd`` a multiple of its width."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from reuse_lens.zoo import shipped_folder

    source = shipped_folder("base")
    small: Any = GPT2LMHeadModel.from_pretrained(source).eval()
    cfg = small.config
    d, heads, d_mlp, layers = cfg.n_embd, cfg.n_head, cfg.n_inner, cfg.n_layer
    copies = shape["n_embd"] // d
    d_head, big_head = d // heads, shape["n_embd"] // shape["n_head"]
    kept = ("vocab_size", "n_positions", "activation_function", "layer_norm_epsilon",
            "bos_token_id", "eos_token_id", "pad_token_id")  # fmt: skip
    fields: dict[str, Any] = {k: v for k, v in cfg.to_dict().items() if k in kept}
    fields |= dict(shape, tie_word_embeddings=False, attn_pdrop=0.0, embd_pdrop=0.0,
                   resid_pdrop=0.0)  # fmt: skip
    config = GPT2Config(**fields)
    big: Any = GPT2LMHeadModel(config).eval()
    width = shape["n_embd"]
    place = {i * (shape["n_layer"] // layers): i for i in range(layers)}

    def tile(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return torch.cat([x] * copies, dim=dim)

    def read_in(w: torch.Tensor) -> torch.Tensor:
        """Rows for the tiled stream: x' @ W' = x @ W."""
        return tile(w, 0) / copies

    # Each head's channels of the zoo's width, placed at the start of a GPT-2 head.
    def head_columns(w: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        out = w.new_zeros(*w.shape[:-1], width)
        for h in range(heads):
            out[..., h * big_head : h * big_head + d_head] = w[..., h * d_head : (h + 1) * d_head]
        return out * scale

    with torch.no_grad():
        for p in big.parameters():
            p.zero_()
        big.transformer.wte.weight.copy_(tile(small.transformer.wte.weight))
        big.transformer.wpe.weight.copy_(tile(small.transformer.wpe.weight))
        big.lm_head.weight.copy_(tile(small.transformer.wte.weight) / copies)
        for name in ("weight", "bias"):
            getattr(big.transformer.ln_f, name).copy_(tile(getattr(small.transformer.ln_f, name)))
        # The scores are q·k / sqrt(d_head): a 64-channel head divides by 8, the zoo's by 4.
        scale = (big_head / d_head) ** 0.5
        for index, block in enumerate(big.transformer.h):
            for ln in (block.ln_1, block.ln_2):
                ln.weight.fill_(1.0)
            if index not in place:
                continue  # writes nothing: its output projections stay zero
            zoo = small.transformer.h[place[index]]
            for big_ln, zoo_ln in ((block.ln_1, zoo.ln_1), (block.ln_2, zoo.ln_2)):
                big_ln.weight.copy_(tile(zoo_ln.weight))
                big_ln.bias.copy_(tile(zoo_ln.bias))
            # GPT-2's Conv1D: x @ weight + bias, weight (in, out); c_attn is q | k | v.
            w_q, w_k, w_v = zoo.attn.c_attn.weight.split(d, dim=1)
            b_q, b_k, b_v = zoo.attn.c_attn.bias.split(d)
            block.attn.c_attn.weight.copy_(
                torch.cat([head_columns(read_in(w_q), scale), head_columns(read_in(w_k)),
                           head_columns(read_in(w_v))], dim=1)
            )  # fmt: skip
            block.attn.c_attn.bias.copy_(
                torch.cat([head_columns(b_q, scale), head_columns(b_k), head_columns(b_v)])
            )
            w_o = block.attn.c_proj.weight  # (head * 64, width): rows of the zoo's heads
            for h in range(heads):
                rows = zoo.attn.c_proj.weight[h * d_head : (h + 1) * d_head]
                w_o[h * big_head : h * big_head + d_head] = tile(rows)
            block.attn.c_proj.bias.copy_(tile(zoo.attn.c_proj.bias))
            block.mlp.c_fc.weight[:, :d_mlp] = read_in(zoo.mlp.c_fc.weight)
            block.mlp.c_fc.bias[:d_mlp] = zoo.mlp.c_fc.bias
            block.mlp.c_proj.weight[:d_mlp] = tile(zoo.mlp.c_proj.weight)
            block.mlp.c_proj.bias.copy_(tile(zoo.mlp.c_proj.bias))
    big.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


# ---- the run ----------------------------------------------------------------------------------


def study_args(args: argparse.Namespace, spec: str, out: Path) -> list[str]:
    argv = ["study", "--model", spec, "--tasks", *args.tasks, "--out", str(out)]
    argv += ["--n", str(args.n), "--n-boot", str(args.n_boot), "--n-random", str(args.n_random)]
    argv += ["--methods", *args.methods, "--threads", "1"]
    if args.model == "zoo" and not args.no_fine_tuned:
        fine = [f"{t}=zoo:ft-{t}" for t in ("ioi", "colored_objects", "entity_tracking")
                if t in args.tasks]  # fmt: skip
        if fine:
            argv += ["--fine-tuned", *fine]
    if args.no_edges:
        argv.append("--no-edges")
    return argv


def main(argv: list[str] | None = None) -> None:
    from reuse_lens import tasks

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", choices=("zoo", "gpt2-small"), default="zoo")
    parser.add_argument("--tasks", nargs="+", default=list(tasks.names()))
    parser.add_argument("--n", type=int, default=64, help="prompt pairs per task")
    parser.add_argument("--n-boot", type=int, default=5)
    parser.add_argument("--n-random", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=["activation", "eap-ig"])
    parser.add_argument("--no-edges", action="store_true")
    parser.add_argument("--no-fine-tuned", action="store_true")
    parser.add_argument("--quick", action="store_true", help="2 tasks, 16 prompts, no edges")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.n, args.n_boot, args.n_random = ["ioi", "sva"], 16, 2, 3
        args.no_edges, args.no_fine_tuned = True, True
    import torch

    torch.set_num_threads(1)
    from reuse_lens.cli import main as cli

    stages = Stages()
    instrument(stages)
    with tempfile.TemporaryDirectory() as tmp:
        spec = "zoo:base"
        if args.model == "gpt2-small":
            spec = str(embed_zoo(Path(tmp) / "zoo_at_gpt2_small"))
        command = study_args(args, spec, Path(tmp) / "out")
        print("reuse-lens " + " ".join(command).replace(tmp, "TMP"), file=sys.stderr)
        cpu, wall = time.process_time(), time.perf_counter()
        with stages.stage("other"):
            code = cli(command)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if code != 0:
        raise SystemExit(code)
    resampled = [k for k in stages.cpu if k.startswith("resamples")]
    rows = {name: stages.cpu.get(name, 0.0) for name in STAGES}
    rows["resamples"] = sum(stages.cpu[k] for k in resampled)
    walls = {name: stages.wall.get(name, 0.0) for name in STAGES}
    walls["resamples"] = sum(stages.wall[k] for k in resampled)
    print(f"\n{' '.join(command[:1])} on {args.model}: {len(args.tasks)} tasks, {args.n} prompts, "
          f"{args.n_boot} resamples, {args.n_random} random circuits; 1 torch thread, "
          f"torch {torch.__version__}")  # fmt: skip
    print("| stage | CPU s | share | wall s |")
    print("|---|---:|---:|---:|")
    for name in STAGES:
        print(f"| {name} | {rows[name]:.1f} | {rows[name] / cpu:.0%} | {walls[name]:.1f} |")
    print(f"| **total** | **{cpu:.1f}** | 100% | {wall:.1f} |")
    inside = {k.split("/", 1)[1]: v for k, v in stages.cpu.items() if k.startswith("resamples/")}
    if inside:
        listed = ", ".join(
            f"{k} {v:.1f} s" for k, v in sorted(inside.items(), key=lambda kv: -kv[1])
        )
        print(f"\nresamples: {listed}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "command": command[:1] + command[3:],
                    "cpu_seconds": cpu,
                    "wall_seconds": wall,
                    "stages_cpu": rows,
                    "stages_wall": walls,
                    "all_cpu": dict(stages.cpu),
                    "calls": dict(stages.calls),
                    "torch": torch.__version__,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
