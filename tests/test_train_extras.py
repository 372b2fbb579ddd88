"""TinyLM with entries that take extra inputs (gates, β, a sink's logit): each made by the layer from
the hidden state (per token) or a learned parameter (per head), passed by name, trained through."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

import variants
from bench import train
from bench.measure import MeasureSettings
from bench.train.model import Attention, ModelConfig, TinyLM
from variants.gated.chunked import decay_chunked, delta_chunked
from variants.gated.recurrence import decay_recurrence, delta_recurrence
from variants.inputs import ExtraInput
from variants.registry import _REGISTRY, Entry

GATE = ExtraInput("g", channels=True, activation=lambda x: F.logsigmoid(x) / 16)  # GLA's gate
BETA = ExtraInput("beta", activation=torch.sigmoid)  # DeltaNet's β
DECAY = ExtraInput("g", activation=F.logsigmoid, initial_raw=3.0)  # Gated DeltaNet's decay, starting near 1
SINK = ExtraInput("sink", per_token=False, initial_raw=-1.0)  # a learned logit per head


def _sink_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                  sink: torch.Tensor) -> torch.Tensor:
    """Softmax attention with one more column per head, the sink's logit, whose weight is dropped."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    column = sink.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:3], 1)
    weights = torch.cat([scores, column], dim=-1).softmax(-1)[..., :-1]
    return weights @ v


TEST_ENTRIES = (
    Entry("test-gla", "chunked", "gated", lambda q, k, v, *, causal, g, chunk: decay_chunked(q, k, v, g, chunk),
          lambda q, k, v, *, causal, g: decay_recurrence(q, k, v, g), flops=lambda p: 0.0,
          params={"chunk": 8}, caps=variants.Capabilities(causal=frozenset({True})), inputs=(GATE,)),
    Entry("test-gdn", "chunked", "gated",
          lambda q, k, v, *, causal, beta, g, chunk: delta_chunked(q, k, v, beta, g, chunk),
          lambda q, k, v, *, causal, beta, g: delta_recurrence(q, k, v, beta, g), flops=lambda p: 0.0,
          params={"chunk": 8}, caps=variants.Capabilities(causal=frozenset({True})), inputs=(BETA, DECAY)),
    Entry("test-sink", "dense", "sparse", _sink_softmax, _sink_softmax, flops=lambda p: 0.0, inputs=(SINK,)),
)


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The test entries in the registry for one test only (what a plugin would register)."""
    for entry in TEST_ENTRIES:
        monkeypatch.setitem(_REGISTRY, (entry.variant, entry.impl), entry)
    yield


CFG = ModelConfig(vocab=32, seq_len=24, d_model=32, heads=2, layers=1, mlp_ratio=0)


def _recording(entry: Entry, seen: list[dict[str, torch.Tensor]]) -> Entry:
    """``entry`` whose forward keeps the keyword tensors it was given."""
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.append({name: value for name, value in kwargs.items() if torch.is_tensor(value)})
        return entry.forward(q, k, v, **kwargs)

    return Entry(entry.variant, entry.impl, entry.family, forward, entry.reference, entry.flops, entry.params,
                 entry.caps, inputs=entry.inputs)


@pytest.mark.parametrize("name", ["test-gla/chunked", "test-gdn/chunked", "test-sink/dense"])
def test_attention_gives_each_extra_input_its_projection_shape_and_activation(name):
    entry, seen = variants.get(name), []
    torch.manual_seed(0)
    layer = Attention(CFG, _recording(entry, seen))
    x = torch.randn(3, 10, CFG.d_model)
    layer(x)
    (given,) = seen
    assert set(given) == {spec.name for spec in entry.inputs}
    for spec in entry.inputs:
        assert given[spec.name].shape == spec.shape(3, CFG.heads, CFG.heads, 10, CFG.head_dim)
        if spec.per_token:  # its own projection of the hidden state, head by head, then the activation
            projection = layer.projections[spec.name]
            assert projection.out_features == CFG.heads * spec.width(CFG.head_dim)
            raw = (x @ projection.weight.T + projection.bias).view(3, 10, CFG.heads, -1).transpose(1, 2)
            expected = spec.activation(raw if spec.channels else raw[..., 0])
        else:  # a learned value per head, from its initial raw value
            expected = spec.activation(torch.full((CFG.heads,), spec.initial_raw))
        torch.testing.assert_close(given[spec.name], expected)
    assert set(layer.projections) == {s.name for s in entry.inputs if s.per_token}
    assert set(layer.per_head) == {s.name for s in entry.inputs if not s.per_token}


@pytest.mark.parametrize("name", ["test-gla/chunked", "test-gdn/chunked", "test-sink/dense"])
def test_extra_inputs_start_from_their_initial_raw_value(name):
    """For a hidden state of zeros only the start is left: the activation of ``initial_raw``."""
    entry = variants.get(name)
    layer = Attention(CFG, entry)
    given = layer.extra_inputs(torch.zeros(2, 5, CFG.d_model))
    for spec in entry.inputs:
        expected = spec.activation(torch.tensor(spec.initial_raw)).expand(given[spec.name].shape)
        torch.testing.assert_close(given[spec.name], expected)


def test_gated_deltanet_starts_with_a_decay_near_one():
    """The registered entry's decay starts at 2^(−1/16) per token (GLA's), not logsigmoid(0) = ½:
    a key is still weighted 2^(−4) = 1/16 after 64 tokens."""
    layer = Attention(CFG, variants.get("gated-deltanet", "chunked"))
    g = layer.extra_inputs(torch.zeros(1, 64, CFG.d_model))["g"]
    torch.testing.assert_close(g.sum(-1).exp(), torch.full_like(g[..., 0], 1 / 16))


def test_gradients_reach_every_extra_input_parameter():
    for name in ("test-gla/chunked", "test-gdn/chunked", "test-sink/dense"):
        torch.manual_seed(0)
        model = TinyLM(CFG, variants.get(name))
        tokens = torch.randint(0, CFG.vocab, (2, CFG.seq_len))
        model(tokens).logsumexp(-1).mean().backward()
        attention = model.blocks[0].attn
        extra = [*attention.projections.parameters(), *attention.per_head.parameters()]
        assert extra and all(p.grad is not None and p.grad.abs().sum() > 0 for p in extra), name


def test_standard_attention_has_no_extra_parameters():
    layer = Attention(CFG, variants.get("standard/sdpa-math"))
    assert not len(layer.projections) and not len(layer.per_head)


@pytest.mark.parametrize("name", ["test-gdn/chunked", "test-sink/dense"])
def test_short_training_with_extra_inputs(name):
    study = train.Study(name="t", task="mqar", variants=(name,), steps=30, batch=8,
                        model={"d_model": 32, "layers": 1, "heads": 2, "mlp_ratio": 0},
                        task_params={"vocab": 32, "seq_len": 24, "pairs": 3})
    (task,) = train.expand(train.TrainSpec(studies=(study,)), "cpu")
    row = task.execute(MeasureSettings())
    assert row["status"] == "ok", row.get("reason")
    assert math.isfinite(row["final_loss"]) and 0 <= row["accuracy"] <= 1
    cfg = ModelConfig(**{**task.config().__dict__, "attn_params": {}})
    bare = TinyLM(cfg, variants.get("standard/sdpa-math")).n_params()
    widths = [s.width(cfg.head_dim) * cfg.heads for s in variants.get(name).inputs if s.per_token]
    per_head = sum(cfg.heads for s in variants.get(name).inputs if not s.per_token)
    extra = sum((cfg.d_model + 1) * w for w in widths) + per_head
    assert row["n_params"] == bare + extra  # the projections (weight and bias) and per-head logits count
