"""The correctness gate checks gradients in the gradient modes (issue 19, item 4): dq, dk, dv against
the float64 reference's at the gate size, the worst in ``err_grad``; a failure makes the point
``incorrect`` (no timing, so no speed-up), computed once per slice in a worker."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import variants
from bench import measure as measuring
from bench.measure import MeasureSettings, measure
from bench.report import analysis
from bench.store import COLUMNS
from variants.standard import eager

QUICK = MeasureSettings(warmup_s=0, target_s=0.005, min_reps=3, max_reps=5, check_len=64)
STANDARD = variants.get("standard/eager")


def scaled_dq(scale: float):
    """Exact attention whose dq is ``scale`` times the true one: q + (scale − 1)(q − q.detach()) equals q
    but carries ``scale`` times its gradient."""
    def forward(q, k, v, *, causal: bool) -> torch.Tensor:
        return eager(q + (scale - 1) * (q - q.detach()), k, v, causal=causal)

    return forward


def entry_with(forward, impl: str = "wrong-grad") -> variants.Entry:
    return variants.Entry("test", impl, "sparse", forward, STANDARD.reference, STANDARD.flops)


def point(mode: str, n: int = 64, dtype: str = "float32") -> variants.Point:
    return variants.Point(batch=1, heads=2, seq_len=n, head_dim=16, dtype=dtype, mode=mode, causal=True)


@pytest.fixture(autouse=True)
def fresh_gates():
    measuring.release_caches()
    yield
    measuring.release_caches()


def test_a_wrong_gradient_fails_the_gate_in_the_gradient_modes_only():
    entry = entry_with(scaled_dq(1.01))
    fwd = measure(entry, point("fwd"), QUICK)
    assert fwd["status"] == "ok" and fwd["err_grad"] is None and fwd["err_ref"] < 1e-5
    for mode in ("fwd_bwd", "bwd"):
        row = measure(entry, point(mode), QUICK)
        assert row["status"] == "incorrect", row
        assert row["reason"].startswith("gradient dq differs from the float64 reference's")
        assert row["err_grad"] == pytest.approx(0.01, rel=1e-3)  # exactly the injected 1%
        assert row["err_ref"] < 1e-5 and "time_ms" not in row  # the output is right, nothing is timed


def test_correct_gradients_pass_and_are_recorded():
    entry = variants.get("local/blocked")
    row = measure(entry, variants.Point(batch=1, heads=2, seq_len=300, head_dim=16, mode="fwd_bwd",
                                        params=entry.resolve({"window": 16})), QUICK)
    assert row["status"] == "ok" and 0 < row["err_grad"] <= entry.tolerance["float32"]


def test_a_nan_gradient_is_the_worst_of_all():
    def nan_dv(q, k, v, *, causal: bool) -> torch.Tensor:
        v = v.clone()
        v.register_hook(lambda grad: torch.full_like(grad, float("nan")))  # the forward stays right
        return eager(q, k, v, causal=causal)

    row = measure(entry_with(nan_dv, "nan-grad"), point("fwd_bwd"), QUICK)
    assert row["status"] == "incorrect" and math.isnan(row["err_grad"]) and "gradient dv" in row["reason"]


def test_the_gate_runs_once_per_slice_of_a_group():
    """Points at least check_len long share the slice: its float64 gradients are computed once, and
    again only after the worker releases its caches for another group."""
    calls = []

    def counted(q, k, v, *, causal: bool) -> torch.Tensor:
        calls.append(q.shape[-2])
        return STANDARD.reference(q, k, v, causal=causal)

    entry = variants.Entry("test", "counted", "standard", STANDARD.forward, counted, STANDARD.flops)
    for n in (64, 128, 256):
        assert measure(entry, point("fwd_bwd", n=n), QUICK)["status"] == "ok"
    assert calls == [64]
    measuring.release_caches()
    measure(entry, point("fwd_bwd", n=256), QUICK)
    assert calls == [64, 64]


def test_an_incorrect_point_gets_no_speed_up_in_the_report():
    """The report compares ok points only: the point with wrong gradients has no ratio row, the one
    with right gradients has."""
    rows = []
    for entry in (variants.get("standard/sdpa-math"), entry_with(scaled_dq(1.01)), entry_with(eager, "right")):
        row = measure(entry, point("fwd_bwd"), QUICK)
        rows.append({"kind": "kernel", "variant": entry.variant, "impl": entry.impl, "family": entry.family,
                     "params": "{}", "mode": "fwd_bwd", "causal": True, "batch": 1, "heads": 2, "seq_len": 64,
                     "head_dim": 16, "dtype": "float32", "device": "cpu", "device_name": "cpu", "q_len": None,
                     **row})
    frame = analysis.with_series(pd.DataFrame(rows).reindex(columns=list(COLUMNS)))
    timings = analysis.timings(frame[frame["status"] == "ok"], None)
    assert set(timings.ratio["series"]) == {"test/right"}
    quality = analysis.quality(frame).set_index("series")
    assert quality.loc["test/wrong-grad", "incorrect"] == 1
    assert quality.loc["test/wrong-grad", "err_grad"] == pytest.approx(0.01, rel=1e-3)
