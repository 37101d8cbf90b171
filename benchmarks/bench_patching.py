"""Exact patching, reuse_lens against TransformerLens 4.3, side by side in one run.

    .venv/bin/python benchmarks/bench_patching.py            # GPT-2-small-sized model
    .venv/bin/python benchmarks/bench_patching.py --quick    # a tiny model, as a smoke test

The model is a random native TransformerBridge of GPT-2-small size (12 layers, 12 heads,
d_model 768, d_mlp 3072; a 5000-token vocabulary). Prompts are 20 random tokens whose
corrupted partner differs at two positions, as in IOI's ABC corruption: one early (2 to 6)
and one later.

TransformerLens runs one full forward pass per patch, so its time is exactly linear in the
number of patches. Where a full TransformerLens sweep would not fit the time budget, it
is run on a random subset of its patches (``--tl-rows``), its time is scaled up to the
full sweep, and the values of that subset are compared with ours; the output says so on
every such line. Likewise the per-sender path-patching reference. reuse_lens always runs
the full sweep. Both use the same prompts; ours runs in TransformerLens's convention
(``direction="denoising"``), so TL's value = our effect + the corrupted baseline.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` per run; on the CPU the
process's peak resident set size (``ru_maxrss``), which only grows, after each run.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch
from transformer_lens import patching as tl

import reuse_lens as rl
from reuse_lens.patching._common import prepare
from reuse_lens.patching.path import _path_hooks, _position_mask
from reuse_lens.tasks.metrics import LogitDiff


def build(quick: bool, n_prompts: int, seed: int) -> tuple[Any, rl.Task]:
    if quick:
        cfg = dict(d_model=64, d_head=16, n_heads=4, n_layers=2, d_mlp=256, d_vocab=500)
        width = 10
    else:
        cfg = dict(d_model=768, d_head=64, n_heads=12, n_layers=12, d_mlp=3072, d_vocab=5000)
        width = 20
    model = rl.load_model({**cfg, "n_ctx": 64, "act_fn": "gelu_new", "seed": seed})
    gen = torch.Generator().manual_seed(seed)
    vocab = cfg["d_vocab"]
    clean = torch.randint(1, vocab, (n_prompts, width), generator=gen)
    corrupted = clean.clone()
    for row in range(n_prompts):
        early = int(torch.randint(2, 7 if width > 10 else 5, (1,), generator=gen))
        late = int(torch.randint(early + 2, width - 1, (1,), generator=gen))
        for pos in (early, late):
            corrupted[row, pos] = (clean[row, pos] + 1 + pos) % (vocab - 1) + 1
    answers = torch.randint(1, vocab, (n_prompts, 2), generator=gen)
    task = rl.Task.from_pairs(
        model, clean.tolist(), corrupted.tolist(), answers[:, 0].tolist(), answers[:, 1].tolist()
    )
    return model, task


def tl_metric(task: rl.Task) -> Callable[[torch.Tensor], torch.Tensor]:
    inputs = task.metric_inputs()
    return lambda logits: LogitDiff()(logits[:, -1].float(), inputs).mean()


class Meter:
    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __call__(self, fn: Callable[[], Any]) -> tuple[Any, float, float]:
        """Run ``fn``; return its value, seconds and peak memory in MiB."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.no_grad():
            value = fn()
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            scale = 1 if platform.system() == "Darwin" else 1024
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
        return value, time.perf_counter() - start, peak


def tl_subset(
    model: Any,
    task: rl.Task,
    axes: dict[str, int],
    rows: int,
    setter: Callable[..., Any],
    activation: str,
    seed: int,
    meter: Meter,
) -> tuple[pd.DataFrame, torch.Tensor, float, float, int]:
    """TL's generic patching on a random subset of its index rows; time scaled to all."""
    grids = torch.cartesian_prod(*[torch.arange(n) for n in axes.values()])
    grids = grids.view(-1, len(axes))
    total = grids.shape[0]
    pick = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:rows]
    frame = pd.DataFrame(grids[pick.sort().values].numpy().copy(), columns=list(axes))
    _, cache = model.run_with_cache(task.clean)
    values, seconds, peak = meter(
        lambda: tl.generic_activation_patch(
            model,
            task.corrupted,
            cache,
            tl_metric(task),
            patch_setter=setter,
            activation_name=activation,
            index_df=frame,
        )
    )
    return frame, values.float().cpu(), seconds * total / len(frame), peak, total


def _cols(frame: pd.DataFrame, *names: str) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(frame[name].to_numpy().copy()) for name in names)


def report(
    name: str, ours: float, theirs: float, diff: float, peaks: tuple[float, float], note: str
) -> dict[str, Any]:
    ratio = theirs / ours
    print(
        f"{name:<34} ours {ours:8.2f}s  baseline {theirs:9.2f}s  ratio {ratio:6.2f}x  "
        f"max|diff| {diff:.2e}  peak MiB ours {peaks[0]:.0f} / baseline {peaks[1]:.0f}  {note}",
        flush=True,
    )
    return {"name": name, "ours_s": ours, "baseline_s": theirs, "ratio": ratio, "max_diff": diff}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, as a smoke test")
    parser.add_argument("--prompts", type=int, default=None, help="prompt pairs (default 32)")
    parser.add_argument(
        "--by-pos-prompts", type=int, default=None, help="prompt pairs for per-position runs"
    )
    parser.add_argument(
        "--tl-rows", type=int, default=None, help="TL patches actually run per sweep"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine, oversubscribed "
        "OpenMP threads spin and make every timing noisy)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    n_prompts = args.prompts or (8 if quick else 32)
    n_by_pos = args.by_pos_prompts or 4
    tl_rows = args.tl_rows or (10_000 if quick else 12)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    model, task = build(quick, n_prompts, args.seed)
    device = str(model.cfg.device)
    meter = Meter(device)
    cfg = model.cfg
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
        f"python {sys.version.split()[0]}"
    )
    print(
        f"model: {cfg.n_layers} layers x {cfg.n_heads} heads, d_model {cfg.d_model}, "
        f"d_mlp {cfg.d_mlp}, d_vocab {cfg.d_vocab}; {n_prompts} prompt pairs of "
        f"{task.clean.shape[1]} tokens ({n_by_pos} for per-position runs)"
    )
    L, H, P = int(cfg.n_layers), int(cfg.n_heads), int(task.clean.shape[1])
    results = []

    # 1. every head, all positions
    ours, t_ours, m_ours = meter(
        lambda: rl.activation_patching(model, task, nodes="heads", direction="denoising")
    )
    frame, values, t_tl, m_tl, total = tl_subset(
        model,
        task,
        {"layer": L, "head": H},
        tl_rows,
        tl.layer_head_vector_patch_setter,
        "z",
        1,
        meter,
    )
    mine = (ours.heads + ours.corrupted)[_cols(frame, "layer", "head")]
    note = f"(TL ran {len(frame)}/{total} patches, time scaled)" if len(frame) < total else ""
    results.append(
        report(
            "heads, all positions",
            t_ours,
            t_tl,
            float((mine - values).abs().max()),
            (m_ours, m_tl),
            note,
        )
    )

    # 2. every head, per position
    small = task.select(list(range(n_by_pos)))
    ours, t_ours, m_ours = meter(
        lambda: rl.activation_patching(
            model, small, nodes="heads", direction="denoising", per_position=True
        )
    )
    frame, values, t_tl, m_tl, total = tl_subset(
        model, small, {"layer": L, "pos": P, "head_index": H}, tl_rows,
        tl.layer_pos_head_vector_patch_setter, "z", 2, meter,
    )  # fmt: skip
    assert ours.heads_by_pos is not None
    mine = (ours.heads_by_pos + ours.corrupted)[_cols(frame, "pos", "layer", "head_index")]
    note = f"(TL ran {len(frame)}/{total} patches, time scaled)" if len(frame) < total else ""
    results.append(
        report(
            "heads, per position",
            t_ours,
            t_tl,
            float((mine - values).abs().max()),
            (m_ours, m_tl),
            note,
        )
    )

    # 3. every MLP, per position (TL's get_act_patch_mlp_out is per position)
    ours, t_ours, m_ours = meter(
        lambda: rl.activation_patching(
            model, small, nodes="mlps", direction="denoising", per_position=True
        )
    )
    frame, values, t_tl, m_tl, total = tl_subset(
        model,
        small,
        {"layer": L, "pos": P},
        tl_rows,
        tl.layer_pos_patch_setter,
        "mlp_out",
        3,
        meter,
    )
    assert ours.mlps_by_pos is not None
    mine = (ours.mlps_by_pos + ours.corrupted)[_cols(frame, "pos", "layer")]
    note = f"(TL ran {len(frame)}/{total} patches, time scaled)" if len(frame) < total else ""
    results.append(
        report(
            "MLPs, per position",
            t_ours,
            t_tl,
            float((mine - values).abs().max()),
            (m_ours, m_tl),
            note,
        )
    )

    # 4. path patching: fast against the per-sender reference loop (hooks on the bridge)
    cases = {
        "path -> logits": {},
        f"path -> a{L - 1}.h0..h{H - 1} (qkv)": {"receivers": [f"a{L - 1}.h{h}" for h in range(H)]},
    }
    for name, case in cases.items():
        fast, t_fast, m_fast = meter(lambda case=case: rl.path_patching(model, task, **case))
        senders = list(fast.nodes())
        gen = torch.Generator().manual_seed(4)
        subset = [senders[int(i)] for i in torch.randperm(len(senders), generator=gen)[:tl_rows]]
        prep = prepare(model, task, None, engine="hooks")
        recv = [rl.parse_node(r) for r in case.get("receivers", [])]
        mask = _position_mask(None, prep)
        ref, t_ref, m_ref = meter(
            lambda recv=recv, prep=prep, mask=mask, subset=subset: _path_hooks(
                prep,
                subset,
                recv,
                ("q", "k", "v") if recv else (),
                False,
                mask,  # type: ignore[arg-type]
            )
        )
        diff = max(abs(fast[node] - value) for node, value in ref.items())
        scaled = t_ref * len(senders) / len(subset)
        note = (
            f"(reference ran {len(subset)}/{len(senders)} senders, time scaled)"
            if len(subset) < len(senders)
            else ""
        )
        results.append(report(name, t_fast, scaled, diff, (m_fast, m_ref), note))

    worst = max(r["max_diff"] for r in results)
    print(f"largest absolute difference over all runs: {worst:.2e}")


if __name__ == "__main__":
    main()
