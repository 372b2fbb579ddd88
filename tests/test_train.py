"""`bench run train`: accumulation equivalence, layer sharing, GELU forms, MQAR, a loss that falls."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import variants
from bench import spec, train
from bench.cli import app
from bench.errors import BadInput
from bench.measure import MeasureSettings
from bench.train.loop import loss_curve
from bench.train.model import GELUS, ModelConfig, TinyLM, gelu_max_abs_error, token_loss_sum
from bench.train.tasks import MQAR, Bytes

SMALL = ModelConfig(vocab=64, seq_len=32, d_model=32, layers=3, heads=2)


def model(cfg: ModelConfig = SMALL, attention: str = "standard/sdpa-math", seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(cfg, variants.get(attention))


def uneven_batch(size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens whose sequences keep very different numbers of scored labels (padding)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, SMALL.vocab, (size, SMALL.seq_len), generator=gen)
    labels = torch.randint(0, SMALL.vocab, (size, SMALL.seq_len), generator=gen)
    for row in range(size):
        keep = 2 + row * (SMALL.seq_len - 2) // size  # 2 … ~30 scored tokens
        labels[row, keep:] = -100
    return tokens, labels


def mean_per_micro_batch(k: int):
    """The 2024 accumulation bug: each micro-batch's mean loss, divided by k (test-only)."""
    def loss_fn(logits, labels):
        total, count = token_loss_sum(logits, labels)
        return total / count / k

    return loss_fn


@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_gradient_equals_full_batch(k):
    tokens, labels = uneven_batch()
    err = train.gradient_rel_error(model(), tokens, labels, k)
    assert err <= 1e-5, err


@pytest.mark.parametrize("k", [2, 4])
def test_wrong_normaliser_is_caught(k):
    tokens, labels = uneven_batch()
    err = train.gradient_rel_error(model(), tokens, labels, k, loss_fn=mean_per_micro_batch(k))
    assert err > 0.05, err  # the check can fail: per-micro-batch means weight tokens unevenly


def _expected_params(cfg: ModelConfig, blocks: int) -> int:
    d, hidden = cfg.d_model, cfg.mlp_ratio * cfg.d_model
    mlp = 2 * d + (d * hidden + hidden) + (hidden * d + d) if hidden else 0
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + mlp
    return cfg.vocab * d + cfg.seq_len * d + blocks * block + 2 * d  # embeddings (tied head), final norm


def test_parameter_counts_shared_unshared_untied():
    unshared = model(ModelConfig(**{**SMALL.__dict__, "layer_sharing": "unshared"}))
    shared = model(ModelConfig(**{**SMALL.__dict__, "layer_sharing": "shared"}))
    untied = model(ModelConfig(**{**SMALL.__dict__, "layer_sharing": "untied"}))
    assert unshared.n_params() == _expected_params(SMALL, SMALL.layers)
    assert shared.n_params() == _expected_params(SMALL, 1)
    assert untied.n_params() == shared.n_params()
    untied.untie()
    assert untied.n_params() == unshared.n_params()


def test_attention_only_blocks():
    cfg = ModelConfig(**{**SMALL.__dict__, "mlp_ratio": 0})
    m = model(cfg)
    assert m.n_params() == _expected_params(cfg, cfg.layers)
    assert all(block.mlp is None for block in m.blocks)
    with pytest.raises(ValueError, match="mlp_ratio=-1"):
        ModelConfig(mlp_ratio=-1)


def test_logits_at_scored_positions_only():
    m = model()
    tokens, labels = uneven_batch()
    scored = labels != -100
    with torch.no_grad():
        assert variants.relative_error(m(tokens, scored), m(tokens)[scored]) <= 1e-6


def test_untied_copies_start_equal_then_diverge():
    m = model(ModelConfig(**{**SMALL.__dict__, "layer_sharing": "untied"}))
    tokens, labels = uneven_batch()
    m.untie()
    first, *others = m.blocks
    for other in others:
        for a, b in zip(first.parameters(), other.parameters(), strict=True):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2)
    train.accumulate_gradients(m, [(tokens, labels)])
    optimizer.step()
    diffs = [max((a - b).abs().max().item() for a, b in zip(first.parameters(), other.parameters(), strict=True))
             for other in others]
    assert all(d > 0 for d in diffs), diffs


@pytest.mark.parametrize("form,published", [("tanh", 4.73e-4), ("sigmoid", 2.03e-2)])
def test_gelu_errors_match_published_maxima(form, published):
    assert gelu_max_abs_error(form) == pytest.approx(published, rel=0.02)
    assert gelu_max_abs_error("exact") == 0.0
    assert set(GELUS) == {"exact", "tanh", "sigmoid"}


def _check_mqar_row(tokens: torch.Tensor, labels: torch.Tensor, pairs: int, vocab: int) -> int:
    """Asserts one sequence's layout; returns 1 if some value directly follows its query."""
    keys, values = tokens[0:2 * pairs:2], tokens[1:2 * pairs:2]
    assert len(set(keys.tolist())) == pairs and len(set(values.tolist())) == pairs  # distinct keys and values
    assert (keys >= 1).all() and (keys < vocab // 2).all() and (values >= vocab // 2).all()  # disjoint halves
    scored = (labels != -100).nonzero().flatten()
    assert len(scored) == pairs and (scored >= 2 * pairs).all()
    answer = dict(zip(keys.tolist(), values.tolist(), strict=True))
    queried = [tokens[pos].item() for pos in scored.tolist()]
    assert sorted(queried) == sorted(answer)  # each key queried exactly once
    assert [labels[pos].item() for pos in scored.tolist()] == [answer[key] for key in queried]
    return int(any(pos + 1 < len(tokens) and tokens[pos + 1].item() == answer[key]
                   for pos, key in zip(scored.tolist(), queried, strict=True)))


def test_mqar_generator_invariants():
    task = MQAR(vocab=128, seq_len=48, pairs=6)
    tokens, labels = task.batch(16, torch.Generator().manual_seed(3))
    again, again_labels = task.batch(16, torch.Generator().manual_seed(3))
    assert torch.equal(tokens, again) and torch.equal(labels, again_labels)
    shown = sum(_check_mqar_row(tokens[row], labels[row], 6, 128) for row in range(16))
    assert shown <= 2  # the value does not follow its query (no answer by elimination), beyond chance
    other, _ = task.batch(16, torch.Generator().manual_seed(4))
    assert not torch.equal(tokens, other)


def test_mqar_mixture_trains_on_fewer_pairs_and_evaluates_on_all():
    task = MQAR(vocab=128, seq_len=48, pairs=6, min_pairs=2)
    tokens, labels = task.batch(64, torch.Generator().manual_seed(0))
    counts = (labels != -100).sum(1)
    assert counts.min() >= 2 and counts.max() <= 6 and len(counts.unique()) >= 4  # a mixture, in range
    for row, pairs in enumerate(counts.tolist()):
        _check_mqar_row(tokens[row], labels[row], pairs, 128)
    for held_out, held_out_labels in task.eval_batches(16, 2, seed=0):
        for row in range(16):
            _check_mqar_row(held_out[row], held_out_labels[row], 6, 128)
    assert task.corpus == "mqar-v128-n48-p6-train2to6" and MQAR(pairs=6, min_pairs=6).corpus.endswith("-p6")


def test_mqar_rejects_layouts_that_cannot_hold_the_pairs():
    with pytest.raises(ValueError, match="seq_len=20"):
        MQAR(vocab=128, seq_len=20, pairs=7)
    with pytest.raises(ValueError, match="vocab=16"):
        MQAR(vocab=16, seq_len=64, pairs=8)
    with pytest.raises(ValueError, match="min_pairs=9"):
        MQAR(pairs=8, min_pairs=9)


def test_bytes_corpus_is_real_python_with_held_out_files():
    task = Bytes(seq_len=64)
    tokens, labels = task.batch(4, torch.Generator().manual_seed(0))
    assert torch.equal(tokens[:, 1:], labels[:, :-1])  # next-byte prediction
    text = bytes(tokens.flatten().tolist()).decode("utf-8", errors="replace")
    assert "def " in text or "import" in text or "self" in text or "return" in text
    assert task.corpus.startswith("py3.")


def test_short_training_lowers_the_loss(tmp_path):
    study = train.Study(name="t", task="mqar", variants=("standard/sdpa-math",), steps=60, batch=16,
                        model={"d_model": 32, "layers": 1, "heads": 1}, task_params={"vocab": 64, "seq_len": 32,
                                                                                      "pairs": 4})
    task = train.expand(train.TrainSpec(studies=(study,)), "cpu")[0]
    untrained = train.evaluate(TinyLM(task.config(), variants.get("standard/sdpa-math")),
                               MQAR(vocab=64, seq_len=32, pairs=4).eval_batches(16, 4, 0))[0]
    row = task.execute(MeasureSettings())
    assert row["status"] == "ok"
    assert row["final_loss"] < untrained - 0.3, (row["final_loss"], untrained)
    assert row["n_params"] > 0 and row["opt_state_bytes"] == 2 * row["grad_bytes"] + 4 * len(
        list(TinyLM(task.config(), variants.get("standard/sdpa-math")).parameters()))  # exp_avg, exp_avg_sq, step
    curve = json.loads(row["loss_curve"])  # 60 steps in 30 windows of 2
    assert len(curve) == 30 and abs(curve[0] - untrained) < 0.1 * untrained, (curve[0], untrained)
    assert curve[-1] < curve[0] - 0.3


def test_loss_curve_averages_windows_of_steps():
    assert loss_curve([1.0, 2.0, 3.0, 4.0, 5.0], points=2) == [2.0, 4.5]  # windows of ⌈5/2⌉ = 3, the last short
    assert loss_curve([float(i) for i in range(60)]) == [2 * i + 0.5 for i in range(30)]
    assert loss_curve([3.0, 1.0]) == [3.0, 1.0]  # fewer steps than points: every step


BAD_TRAIN = [
    (["--task", "poetry"], "poetry"),
    (["--accum-steps", "3"], "accum_steps=3"),
    (["--sharing", "half"], "half"),
    (["--gelu", "relu"], "relu"),
    (["--steps", "0"], "steps=0"),
    (["--variants", "nosuch"], "nosuch"),
    (["--preset", "nosuch"], "nosuch"),
    (["--seeds", "0"], "seeds"),
    (["--study", "recall,poetry"], "poetry"),
]


@pytest.mark.parametrize("flags,named", BAD_TRAIN, ids=[" ".join(f) for f, _ in BAD_TRAIN])
def test_bad_train_input_exits_2(tmp_path, flags, named):
    result = CliRunner().invoke(app, ["run", "train", "--device", "cpu", "--out", str(tmp_path / "o"), *flags])
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert not (tmp_path / "o").exists()


def test_train_table_gives_study_defaults_that_a_study_replaces(tmp_path):
    config = tmp_path / "t.toml"
    config.write_text("""
[train]
variants = ["standard/sdpa-math", "local/blocked"]
steps = 7
[train.model]
d_model = 32
mlp_ratio = 0
[[study]]
name = "a"
[[study]]
name = "b"
variants = ["linear-elu1/chunked"]
model = { layers = 3 }
""")
    a, b = train.load(None, config).studies
    assert (a.variants, a.steps, a.model) == (("standard/sdpa-math", "local/blocked"), 7, {"d_model": 32, "mlp_ratio": 0})
    assert (b.variants, b.steps, b.model) == (("linear-elu1/chunked",), 7, {"layers": 3})  # whole table replaced
    config.write_text('[train]\nvariants = "standard"\n[[study]]\nname = "a"\n')
    with pytest.raises(BadInput, match="train.variants must be a list"):
        train.load(None, config)


@pytest.mark.parametrize("name", spec.preset_names("train"))
def test_every_train_preset_validates_and_is_named_in_the_help(name):
    help_text = re.sub(r"-\s+", "-", " ".join(CliRunner().invoke(app, ["run", "train", "--help"]).output.split()))
    assert name in help_text
    loaded = train.override(train.load(name, None), device="cpu")  # no CUDA here: the grid is checked on the CPU
    assert train.expand(train.validate(loaded), "cpu")


def test_study_flag_keeps_the_named_studies():
    spec = train.override(train.load("quick", None), only=("gelu", "recall"), seeds=3)
    assert [s.name for s in spec.studies] == ["recall", "gelu"] and spec.seeds == 3
    assert train.override(train.load("quick", None)).studies == train.load("quick", None).studies


# Spec files that must exit 2 naming the bad value, with nothing written. "[[study]]" stands for a
# study of standard attention on MQAR.
BAD_CONFIGS = [
    ('[train]\nwarmup = 1.5\n[[study]]', "warmup=1.5"),
    ('[train]\nuntie_at = -0.1\n[[study]]', "untie_at=-0.1"),
    ('[train]\nwarmup = true\n[[study]]', "warmup=True"),
    ('[train]\ntimeout_s = -5\n[[study]]', "timeout_s: -5"),
    ('[train]\ntimeout_s = "x"\n[[study]]', "timeout_s: 'x'"),
    ('[train]\nlr = true\n[[study]]', "lr=True"),
    ('[[study]]\nname = "a"\n[[study]]\nname = "a"', "'a' is used by 2 studies"),
    ('[[study]]\nname = 3', "study name 3"),
    ('[train]\nparams = 3\n[[study]]\nname = "a"', "params=3 must be a table"),
    ('[[study]]\nname = "a"\ngelu = ["tanh"]\nmodel = { mlp_ratio = 0 }', "gelu=tanh changes nothing"),
    ('[[study]]\nmodel = { mlp_ratio = -1 }', "mlp_ratio=-1"),
    ('[[study]]\nmodel = { mlp_ratio = true }', "mlp_ratio=True"),
    ('[[study]]\nmodel = { mlp_ratio = 1.5 }', "mlp_ratio=1.5"),
]


@pytest.mark.parametrize("text,named", BAD_CONFIGS, ids=[n for _, n in BAD_CONFIGS])
def test_bad_train_config_exits_2(tmp_path, text, named):
    config = tmp_path / "t.toml"
    config.write_text(text.replace("[[study]]", '[[study]]\ntask = "mqar"\nvariants = ["standard/sdpa-math"]'))
    result = CliRunner().invoke(app, ["run", "train", "--config", str(config), "--device", "cpu",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_train_command_end_to_end(tmp_path):
    config = tmp_path / "t.toml"
    config.write_text("""
[train]
device = "cpu"
[[study]]
name = "acc"
task = "bytes"
variants = ["standard/sdpa-math", "linear-elu1/chunked"]
accum_steps = [1, 2]
steps = 3
batch = 4
[study.model]
d_model = 32
layers = 1
heads = 1
[study.task_params]
seq_len = 32
""")
    result = CliRunner().invoke(app, ["run", "train", "--config", str(config), "--out", str(tmp_path), "--run-id", "t"])
    assert result.exit_code == 0, result.output
    rows = pd.read_parquet(tmp_path / "t")
    assert len(rows) == 4 and set(rows["status"]) == {"ok"} and set(rows["kind"]) == {"train"}
    assert rows["key"].is_unique and (rows["bpb"] > 0).all()
    assert (rows.loc[rows["accum_steps"] == 2, "grad_rel_err"] < 1e-5).all()
