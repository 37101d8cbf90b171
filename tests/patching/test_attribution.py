"""Attribution patching (EAP, EAP-IG; nodes and edges) against independent references.

- node-level EAP equals TransformerLens 4.3's ``attribution_patch`` (one prompt at a time,
  arguments swapped to turn its denoising convention into our noising one);
- EAP-IG approaches exact activation patching as ``steps`` grows, on a model trained for
  induction;
- edge scores add up to node scores, and each receiver's scores equal a directional
  derivative computed with plain autograd through the model's own LayerNorm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.tools.analysis.attribution_patching import attribution_patch

import reuse_lens as rl
from reuse_lens.nodes import MLP, AttentionHead, edges_of, shape_of
from reuse_lens.patching.attribution import attribution_patching
from reuse_lens.patching.edges import EdgeScores
from reuse_lens.patching.scores import NodeScores
from reuse_lens.tasks.metrics import MetricError, MetricInputs
from reuse_lens.tasks.task import Task, TaskError
from tests.conftest import native_config

# ---- helpers ------------------------------------------------------------------------------


def random_task(
    model: Any, lengths: tuple[int, ...] = (6, 8, 7, 8), *, seed: int = 1, low: int = 1
) -> Task:
    """Random prompts of the given lengths; the corruption changes tokens 2 and 3."""
    d_vocab = int(model.cfg.d_vocab)
    g = torch.Generator().manual_seed(seed)
    clean = [torch.randint(low, d_vocab, (n,), generator=g).tolist() for n in lengths]
    corrupted = [
        [t if i not in (2, 3) else low + (t + 7 - low) % (d_vocab - low) for i, t in enumerate(c)]
        for c in clean
    ]
    answers = torch.randint(low, d_vocab, (len(lengths),), generator=g).tolist()
    wrong = [low + (a + 1 - low) % (d_vocab - low) for a in answers]
    return Task.from_pairs(model, clean, corrupted, answers, wrong)


def tl_node_scores(model: Any, task: Task) -> tuple[Tensor, Tensor | None]:
    """TransformerLens's EAP per head and MLP, summed over positions, averaged over prompts.

    TL takes its gradient on the run it calls ``corrupt`` and scores (a_clean − a_corrupt):
    passing our corrupted prompts as its clean and our clean as its corrupt gives
    (a_corrupted − a_clean) · ∂m/∂a on our clean run, our noising convention.
    """
    shape = shape_of(model)
    heads = torch.zeros(shape.n_layers, shape.n_heads)
    mlps = torch.zeros(shape.n_layers) if shape.has_mlps else None
    for i in range(len(task)):
        one = task.select([i])
        pos = int(one.answer_pos[0])
        inputs = one.metric_inputs()

        def metric_fn(logits: Tensor, pos: int = pos, inputs: MetricInputs = inputs) -> Tensor:
            return task.metric(logits[:, pos].float(), inputs).sum()

        result = attribution_patch(model, one.corrupted, one.clean, metric_fn)
        for node, value in result.node_scores.items():
            if node.kind == "attn_head_out":
                heads[node.layer, node.head] += value
            elif node.kind == "mlp_out" and mlps is not None:
                mlps[node.layer] += value
    n = len(task)
    return heads / n, None if mlps is None else mlps / n


def as_node(scores: NodeScores | EdgeScores) -> NodeScores:
    assert isinstance(scores, NodeScores)
    return scores


def as_edge(scores: NodeScores | EdgeScores) -> EdgeScores:
    assert isinstance(scores, EdgeScores)
    return scores


def node_vector(scores: NodeScores) -> Tensor:
    parts = [scores.heads.flatten()]
    if scores.mlps is not None:
        parts.append(scores.mlps)
    return torch.cat(parts)


MODELS = {
    "ln_mlp": {},
    "attn_only": {"attn_only": True},
    "no_ln": {"normalization_type": None},
    "rms": {"normalization_type": "RMS"},
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def small_model(request: pytest.FixtureRequest) -> Any:
    return rl.load_model(native_config(**MODELS[request.param]))


# ---- EAP against TransformerLens ------------------------------------------------------------


def test_eap_equals_transformer_lens(small_model: Any) -> None:
    if small_model.cfg.attn_only:
        pytest.skip("TransformerLens's attribution_patch requires hook_mlp_out in every layer")
    task = random_task(small_model)
    ours = as_node(attribution_patching(small_model, task))
    heads, mlps = tl_node_scores(small_model, task)
    torch.testing.assert_close(ours.heads, heads, atol=1e-5, rtol=1e-4)
    if mlps is not None:
        assert ours.mlps is not None
        torch.testing.assert_close(ours.mlps, mlps, atol=1e-5, rtol=1e-4)
    assert ours.heads.abs().max() > 1e-3  # the check is not vacuous


def test_eap_equals_transformer_lens_on_hf_gpt2(hf_model: Any) -> None:
    task = random_task(hf_model, lengths=(7, 9, 9), low=5)
    ours = as_node(attribution_patching(hf_model, task, batch_size=2))
    heads, mlps = tl_node_scores(hf_model, task)
    torch.testing.assert_close(ours.heads, heads, atol=1e-5, rtol=1e-4)
    assert ours.mlps is not None and mlps is not None
    torch.testing.assert_close(ours.mlps, mlps, atol=1e-5, rtol=1e-4)


def test_per_position_sums_to_totals(native_model: Any) -> None:
    task = random_task(native_model)
    scores = as_node(attribution_patching(native_model, task, per_position=True))
    assert scores.heads_by_pos is not None and scores.mlps_by_pos is not None
    assert scores.heads_by_pos.shape == (task.clean.shape[1], 2, 4)
    torch.testing.assert_close(scores.heads_by_pos.sum(0), scores.heads)
    torch.testing.assert_close(scores.mlps_by_pos.sum(0), scores.mlps)
    # Positions before the first corrupted token (2) see no difference at all.
    assert scores.heads_by_pos[:2].abs().max() == 0


def test_eap_ig_with_one_step_is_eap(native_model: Any) -> None:
    task = random_task(native_model)
    eap = as_node(attribution_patching(native_model, task))
    ig = as_node(attribution_patching(native_model, task, method="eap-ig", steps=1))
    torch.testing.assert_close(ig.heads, eap.heads, atol=1e-6, rtol=0)


# ---- EAP-IG against exact activation patching on a trained model ----------------------------

HALF = 6
VOCAB = 40


def _repeated(n: int, generator: torch.Generator | None = None) -> Tensor:
    r = torch.randint(1, VOCAB, (n, HALF), generator=generator)
    return torch.cat([torch.zeros(n, 1, dtype=torch.long), r, r], dim=1)


@pytest.fixture(scope="module")
def induction_model() -> Any:
    """A 2-layer attention-only model trained briefly (60 steps, a few seconds) to copy repeated halves."""
    torch.manual_seed(0)
    model = rl.load_model(
        native_config(attn_only=True, d_vocab=VOCAB, n_ctx=2 * HALF + 1, d_model=32, d_head=8)
    )
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        x = _repeated(32)
        log_probs = model(x)[:, HALF + 1 : -1].log_softmax(-1)
        loss = -log_probs.gather(-1, x[:, HALF + 2 :, None]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def induction_task(induction_model: Any) -> Task:
    """Predict the last token of the repeat; the corruption changes it in the first half."""
    x = _repeated(16, torch.Generator().manual_seed(5))
    clean, answers = x[:, :-1], x[:, -1]
    wrong = answers % (VOCAB - 1) + 1
    corrupted = clean.clone()
    corrupted[:, HALF] = wrong
    return Task.from_pairs(
        induction_model, clean.tolist(), corrupted.tolist(), answers.tolist(), wrong.tolist()
    )


def exact_head_patching(model: Any, task: Task) -> Float[Tensor, "layer head"]:
    """Noising activation patching of each head's output (hook_z), one forward per head."""
    with torch.no_grad():
        _, cache = model.run_with_cache(task.corrupted)
        inputs = task.metric_inputs()
        rows = torch.arange(len(task))
        clean = task.metric(model(task.clean)[rows, task.answer_pos], inputs).mean()
        shape = shape_of(model)
        out = torch.zeros(shape.n_layers, shape.n_heads)
        for layer in range(shape.n_layers):
            name = f"blocks.{layer}.attn.hook_z"
            for head in range(shape.n_heads):

                def patch(z: Tensor, hook: Any, head: int = head, name: str = name) -> Tensor:
                    del hook
                    z = z.clone()
                    z[:, :, head] = cache[name][:, :, head]
                    return z

                logits = model.run_with_hooks(task.clean, fwd_hooks=[(name, patch)])
                out[layer, head] = task.metric(logits[rows, task.answer_pos], inputs).mean() - clean
    return out


def test_eap_ig_approaches_activation_patching(induction_model: Any, induction_task: Task) -> None:
    evaluation = rl.evaluate(induction_model, induction_task)
    assert evaluation["accuracy"] == 1.0 and evaluation["corrupted_accuracy"] == 0.0
    exact = exact_head_patching(induction_model, induction_task).flatten()
    errors, correlations = [], []
    for steps in (1, 8):
        scores = as_node(
            attribution_patching(induction_model, induction_task, method="eap-ig", steps=steps)
        )
        approx = scores.heads.flatten()
        correlations.append(float(torch.corrcoef(torch.stack([approx, exact]))[0, 1]))
        errors.append(float((approx - exact).abs().max()))
    assert correlations[-1] >= 0.95, correlations
    print(f"EAP-IG vs activation patching: correlation {correlations}, max error {errors}")
    # More steps give a better estimate of each patch's effect.
    assert errors[-1] < errors[0], errors
    assert errors[-1] < 0.2 * float(exact.abs().max()), errors


# ---- edges ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_edges_sum_to_node_scores(small_model: Any, method: str) -> None:
    task = random_task(small_model)
    nodes = as_node(attribution_patching(small_model, task, method=method, steps=3))  # type: ignore[arg-type]
    edges = as_edge(
        attribution_patching(small_model, task, method=method, level="edge", steps=3)  # type: ignore[arg-type]
    )
    assert [e.name for e in edges.edges] == [e.name for e in edges_of(small_model)]
    from_edges = edges.to_node_scores()
    torch.testing.assert_close(from_edges.heads, nodes.heads, atol=1e-5, rtol=1e-4)
    if nodes.mlps is not None:
        assert from_edges.mlps is not None
        torch.testing.assert_close(from_edges.mlps, nodes.mlps, atol=1e-5, rtol=1e-4)
    assert edges.clean == pytest.approx(nodes.clean)
    assert edges.corrupted == pytest.approx(nodes.corrupted)


def test_edges_sum_to_node_scores_on_hf_gpt2(hf_model: Any) -> None:
    task = random_task(hf_model, lengths=(7, 9, 9), low=5)
    nodes = as_node(attribution_patching(hf_model, task, method="eap-ig", steps=2))
    edges = as_edge(attribution_patching(hf_model, task, method="eap-ig", steps=2, level="edge"))
    from_edges = edges.to_node_scores()
    torch.testing.assert_close(from_edges.heads, nodes.heads, atol=1e-5, rtol=1e-4)
    assert from_edges.mlps is not None and nodes.mlps is not None
    torch.testing.assert_close(from_edges.mlps, nodes.mlps, atol=1e-5, rtol=1e-4)


@dataclass
class _Directional:
    """Moves one receiver's input by ε·Δ(its residual input), computing q/k/v by hand."""

    layer: int
    head: int | None  # None: the MLP
    kind: str
    delta: Tensor
    eps: Tensor

    def hooks(self, model: Any) -> list[tuple[str, Any]]:
        block = model.blocks[self.layer]
        resid: dict[str, Tensor] = {}
        pre = "hook_resid_pre" if self.head is not None else "hook_resid_mid"

        def keep(x: Tensor, hook: Any) -> None:
            del hook
            resid["x"] = x

        if self.head is None:

            def mlp_in(x: Tensor, hook: Any) -> Tensor:
                del hook
                return block.ln2(resid["x"] + self.eps * self.delta)

            return [
                (f"blocks.{self.layer}.{pre}", keep),
                (f"blocks.{self.layer}.mlp.hook_in", mlp_in),
            ]

        w = {"q": model.W_Q, "k": model.W_K, "v": model.W_V}[self.kind][self.layer, self.head]
        b = {"q": model.b_Q, "k": model.b_K, "v": model.b_V}[self.kind][self.layer, self.head]
        head = self.head

        def qkv(t: Tensor, hook: Any) -> Tensor:
            del hook
            moved = block.ln1(resid["x"] + self.eps * self.delta) @ w + b
            out = t.clone()
            out[:, :, head] = moved
            return out

        return [
            (f"blocks.{self.layer}.{pre}", keep),
            (f"blocks.{self.layer}.attn.hook_{self.kind}", qkv),
        ]


def test_receiver_scores_are_directional_derivatives(native_model: Any) -> None:
    """Σ over senders of edge(u → v) = d metric / dε with v's input moved by ε·Δin_v.

    The reference recomputes the receiver's q (or k, v, MLP input) from the residual with
    the block's LayerNorm inside the forward pass and differentiates with autograd; EAP
    instead maps ∂m/∂q back through W_Q and the LayerNorm's Jacobian after the fact.
    """
    model = native_model
    task = random_task(model)
    edges = as_edge(attribution_patching(model, task, level="edge"))
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(task.clean)
        _, corrupted_cache = model.run_with_cache(task.corrupted)
    rows = torch.arange(len(task))
    inputs = task.metric_inputs()
    cases = [(0, 1, "q"), (1, 2, "k"), (1, 3, "v"), (0, None, "mlp"), (1, None, "mlp")]
    for layer, head, kind in cases:
        hook = f"blocks.{layer}.{'hook_resid_pre' if head is not None else 'hook_resid_mid'}"
        delta = corrupted_cache[hook] - clean_cache[hook]
        eps = torch.zeros((), requires_grad=True)
        moved = _Directional(layer, head, kind, delta, eps)
        logits = model.run_with_hooks(task.clean, fwd_hooks=moved.hooks(model))
        metric = task.metric(logits[rows, task.answer_pos], inputs).mean()
        (derivative,) = torch.autograd.grad(metric, eps)
        receiver = (
            f"{AttentionHead(layer, head).name}<{kind}>" if head is not None else MLP(layer).name
        )
        total = sum(v for name, v in edges.as_dict().items() if name.endswith(f"->{receiver}"))
        assert total == pytest.approx(float(derivative), abs=1e-5, rel=1e-4), receiver
        assert abs(float(derivative)) > 1e-4  # not vacuous


def test_edge_scores_api(native_model: Any) -> None:
    task = random_task(native_model)
    edges = as_edge(attribution_patching(native_model, task, level="edge"))
    as_dict = edges.as_dict()
    assert len(as_dict) == len(edges_of(native_model))
    name, value = edges.top(1)[0]
    assert abs(value) == max(abs(v) for v in as_dict.values())
    assert edges[name] == value
    assert "input->a0.h0<q>" in as_dict and "m1->logits" in as_dict
    normalized = edges.normalized()
    gap = edges.clean - edges.corrupted
    assert normalized[name] == pytest.approx(value / gap)


# ---- invariants and errors ------------------------------------------------------------------


@pytest.mark.parametrize(("method", "level"), [("eap", "node"), ("eap-ig", "edge")])
def test_clean_equals_corrupted_gives_zero(native_model: Any, method: str, level: str) -> None:
    import dataclasses

    # from_pairs refuses pairs that measure nothing; the invariant is tested around it.
    task = random_task(native_model)
    same = dataclasses.replace(task, corrupted=task.clean.clone())
    scores = attribution_patching(native_model, same, method=method, level=level, steps=3)  # type: ignore[arg-type]
    values = torch.tensor(list(scores.as_dict().values()))
    assert values.abs().max() == 0
    assert scores.clean == pytest.approx(scores.corrupted)


def test_deterministic_and_batch_independent(native_model: Any) -> None:
    """Mixed lengths in one padded batch give each prompt's scores as when it runs alone."""
    task = random_task(native_model, lengths=(5, 9, 7, 9, 6))
    together = as_node(attribution_patching(native_model, task, method="eap-ig", steps=3))
    again = as_node(attribution_patching(native_model, task, method="eap-ig", steps=3))
    assert torch.equal(together.heads, again.heads)
    alone = [
        as_node(attribution_patching(native_model, task.select([i]), method="eap-ig", steps=3))
        for i in range(len(task))
    ]
    mean_alone = torch.stack([node_vector(s) for s in alone]).mean(0)
    torch.testing.assert_close(node_vector(together), mean_alone, atol=1e-5, rtol=1e-4)
    chunked = as_node(
        attribution_patching(native_model, task, method="eap-ig", steps=3, batch_size=2)
    )
    torch.testing.assert_close(node_vector(chunked), node_vector(together), atol=1e-5, rtol=1e-4)


def test_metric_option_and_baselines(native_model: Any) -> None:
    task = random_task(native_model)
    scores = as_node(attribution_patching(native_model, task, metric="prob_diff"))
    evaluation = rl.evaluate(native_model, task.with_metric("prob_diff"))
    assert scores.clean == pytest.approx(evaluation["clean_metric"], abs=1e-6)
    assert scores.corrupted == pytest.approx(evaluation["corrupted_metric"], abs=1e-6)
    assert scores.settings["metric"] == "prob_diff"


@dataclass(frozen=True)
class _NaNMetric:
    name: str = "nan"
    needs_clean_logits: bool = False

    def __call__(self, logits: Tensor, inputs: MetricInputs) -> Tensor:
        del inputs
        return logits[:, 0] * float("nan")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "acdc"}, "unknown attribution method"),
        ({"level": "path"}, "unknown attribution level"),
        ({"method": "eap-ig", "steps": 0}, "steps must be a positive integer"),
        ({"batch_size": 0}, "batch_size"),
        ({"level": "edge", "per_position": True}, "per_position"),
        ({"method": "eap", "metric": "kl_div"}, "zero gradient"),
    ],
)
def test_bad_options(native_model: Any, options: dict[str, Any], message: str) -> None:
    task = random_task(native_model)
    with pytest.raises(ValueError, match=message):
        attribution_patching(native_model, task, **options)


def test_training_mode_is_refused() -> None:
    model = rl.load_model(native_config())
    task = random_task(model)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        attribution_patching(model, task)


def test_nan_metric_is_refused(native_model: Any) -> None:
    task = random_task(native_model)
    with pytest.raises(MetricError, match="non-finite"):
        attribution_patching(native_model, task, metric=_NaNMetric())


def test_metric_without_gradient_is_refused(native_model: Any) -> None:
    task = random_task(native_model)
    with pytest.raises(MetricError, match="no gradient"):
        attribution_patching(native_model, task, metric="accuracy")


def test_task_for_another_vocabulary_is_refused(native_model: Any) -> None:
    other = rl.load_model(native_config(d_vocab=60))
    task = random_task(other)
    with pytest.raises(TaskError, match="vocabulary"):
        attribution_patching(native_model, task)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("has_mlps", [True, False])
def test_to_node_scores_sums_each_senders_edges(parallel: bool, has_mlps: bool) -> None:
    """The vectorised sum equals a plain loop over the edges (``input``'s left out)."""
    from reuse_lens.nodes import ModelShape

    shape = ModelShape(n_layers=3, n_heads=2, has_mlps=has_mlps, parallel=parallel and has_mlps)
    edges = tuple(edges_of(shape))
    scores = torch.randn(len(edges), generator=torch.Generator().manual_seed(0))
    summed = EdgeScores(edges, scores, shape, 1.0, 0.0, "eap").to_node_scores()
    heads, mlps = torch.zeros(3, 2), torch.zeros(3)
    for edge, value in zip(edges, scores.tolist(), strict=True):
        if isinstance(edge.sender, AttentionHead):
            heads[edge.sender.layer, edge.sender.head] += value
        elif isinstance(edge.sender, MLP):
            mlps[edge.sender.layer] += value
    torch.testing.assert_close(summed.heads, heads, atol=1e-6, rtol=0)
    if has_mlps:
        assert summed.mlps is not None
        torch.testing.assert_close(summed.mlps, mlps, atol=1e-6, rtol=0)
    else:
        assert summed.mlps is None


@pytest.mark.parametrize(("budget", "batch_size"), [(None, None), (None, 4), ("300KiB", None)])
def test_edge_attribution_from_a_held_preparation_gives_the_same_scores(
    budget: str | None, batch_size: int | None
) -> None:
    """discover_circuit hands its evaluator's verified forward and unablated runs to edge
    attribution; the scores are those of a call of its own, in one chunk of prompts or
    in several (each reading its rows of the held runs), and where nothing is held."""
    from reuse_lens.patching.ablation import AblationRunner
    from reuse_lens.patching.attribution import _attribution_patching

    model = rl.load_model(native_config(n_layers=2, d_model=32, n_heads=4))
    task = random_task(model, (6, 8, 7, 8, 5, 8), seed=3)
    runner = AblationRunner(model, task, memory_budget=budget, hold_runs=True)
    settings: dict[str, Any] = dict(
        method="eap-ig", level="edge", steps=3, metric=None, batch_size=batch_size,
        engine="auto", memory_budget=budget, experts=False, routing="frozen",
    )  # fmt: skip
    held = runner.prep.held_runs()
    assert (held is not None) == (budget is None)  # a small budget holds no runs
    handed = _attribution_patching(model, task, per_position=False, prep=runner.prep, **settings)
    own = rl.attribution_patching(model, task, **settings)
    assert isinstance(handed, EdgeScores) and isinstance(own, EdgeScores)
    torch.testing.assert_close(handed.scores, own.scores, atol=1e-6, rtol=0)
    assert (handed.clean, handed.corrupted, handed.settings) == (
        own.clean, own.corrupted, own.settings
    )  # fmt: skip
