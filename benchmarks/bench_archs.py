"""All-position head activation patching per architecture family, against TransformerLens.

    .venv/bin/python benchmarks/bench_archs.py                 # gpt2, llama_gqa, gpt_neox, gemma2
    .venv/bin/python benchmarks/bench_archs.py --archs qwen3   # also qwen3, gptj

Each family is a random ``transformers`` model (``tests/archs.py``'s configs) resized
to 4 layers, d_model 256, 8 query heads of 32 (2 key/value heads where the family has
grouped-query attention) and an MLP of 1024, with a 1000-word vocabulary. The task is 32
prompts of 24 random tokens, each corrupted at two positions. reuse_lens runs
``activation_patching(nodes="heads", direction="denoising")`` end to end (including its
check of the functional logits against the bridge's); TransformerLens runs
``get_act_patch_attn_head_out_all_pos`` (including its clean cache). TL's value is our
effect plus the corrupted baseline; the max abs diff compares the two.

Each run is a fresh process on one torch thread, so its peak resident set size (minus
the size after loading the model) is that run's own peak memory.
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


def child(folder: Path, engine: str) -> dict[str, Any]:
    """One timed run in this (fresh) process."""
    import torch
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
    task = rl.Task.from_pairs(
        model, clean.tolist(), corrupted.tolist(), answers[:, 0].tolist(), answers[:, 1].tolist()
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.no_grad():
        if engine == "ours":
            scores = rl.activation_patching(model, task, nodes="heads", direction="denoising")
            values = (scores.heads + scores.corrupted).tolist()
            used = scores.settings["engine"]
        else:
            inputs = task.metric_inputs()
            _, cache = model.run_with_cache(task.clean)
            out = tl.get_act_patch_attn_head_out_all_pos(
                model,
                task.corrupted,
                cache,
                lambda logits: LogitDiff()(logits[:, -1].float(), inputs).mean(),
            )
            values, used = out.float().tolist(), "transformer_lens"
    seconds = time.perf_counter() - start
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * scale / 2**20
    return {"seconds": seconds, "peak_mib": peak, "values": values, "engine": used}


def run_child(folder: Path, engine: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(folder), engine],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS), choices=list(CONFIGS))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1])))
        return
    import torch

    print(
        f"all-position head activation patching, {SIZE['n_layers']} layers, d_model "
        f"{SIZE['d_model']}, {N_PROMPTS} prompts x {WIDTH} tokens, 1 CPU thread, "
        f"torch {torch.__version__}"
    )
    print(f"{'arch':12s} {'engine':10s} {'ours s':>7s} {'TL s':>7s} {'speed-up':>8s} "
          f"{'max|diff|':>9s} {'peak MiB ours/TL':>17s}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.archs:
            folder = Path(tmp) / name
            build(name, folder)
            ours, theirs = run_child(folder, "ours"), run_child(folder, "tl")
            diff = float(
                (torch.tensor(ours["values"]) - torch.tensor(theirs["values"])).abs().max()
            )
            print(
                f"{name:12s} {ours['engine']:10s} {ours['seconds']:7.2f} {theirs['seconds']:7.2f} "
                f"{theirs['seconds'] / ours['seconds']:7.1f}x {diff:9.1e} "
                f"{ours['peak_mib']:8.0f} / {theirs['peak_mib']:<6.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
