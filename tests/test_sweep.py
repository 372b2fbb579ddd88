"""`bench run sweep`: validation, end to end into parquet, resume after a crash, worker faults, memory."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from support import bench, faulty_env
from typer.testing import CliRunner

import variants
from bench import measure, plan, spec
from bench.cli import app
from bench.device import CpuDevice
from bench.store import SCHEMA_VERSION, read_results

TINY = ["--variants", "standard/eager,local/blocked,linear-elu1/linear", "--seq-lens", "64,128",
        "--modes", "fwd,fwd_bwd", "--device", "cpu", "--heads", "2", "--head-dim", "16"]


# --- validation: exit 2, one message naming the bad value, nothing written -----------------------

BAD_FLAGS = [
    (["--variants", "nosuch"], "nosuch"),
    (["--variants", "local/nosuch"], "nosuch"),
    (["--seq-lens", "0"], "0"),
    (["--seq-lens", "-5"], "-5"),
    (["--seq-lens", "12x"], "12x"),
    (["--seq-lens", "99999999999"], "99999999999"),
    (["--batch-sizes", "0"], "0"),
    (["--heads", "0"], "0"),
    (["--dtype", "float8"], "float8"),
    (["--modes", "fwd,sideways"], "sideways"),
    (["--device", "tpu"], "tpu"),
    (["--device", "cuda"], "cuda"),
    (["--timeout-s", "0"], "0"),
    (["--preset", "nosuch"], "nosuch"),
    (["--run-id", "../escape"], "../escape"),
    (["--resume"], "--resume"),
    (["--variants", "standard/sdpa-flash", "--head-dim", "512"], "512"),
    (["--max-mem-gb", "-1"], "-1"),
    (["--heads", "4", "--kv-heads", "3"], "kv_heads: 3 does not divide heads=4"),
    (["--heads", "4", "--gqa-ratio", "3"], "gqa_ratios: 3 does not divide heads=4"),
    (["--kv-heads", "0"], "kv_heads: 0"),
    (["--layouts", "dense,jagged"], "jagged"),
    (["--layouts", "packed", "--doc-dist", "zipf"], "zipf"),
    (["--layouts", "packed", "--docs-per-row", "65"], "65 documents do not fit in a row of 64 tokens"),
    (["--layouts", "packed", "--docs-per-row", "0"], "documents.count: 0"),
    (["--layouts", "packed", "--doc-seed", "-1"], "documents.seed: -1"),
]


@pytest.mark.parametrize("flags,named", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_exit_2_and_write_nothing(tmp_path, flags, named):
    if flags[:2] == ["--device", "cuda"] and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    base = ["run", "sweep", "--variants", "standard/eager", "--seq-lens", "64", "--device", "cpu",
            "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, base + flags)
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert not (tmp_path / "out").exists()


BAD_TOML = [
    ("[sweep]\nvariants = ['standard/eager']\nseq_lens = [64]\nbogus = 1\n", "bogus"),
    ("[sweep\nvariants = 1", "malformed TOML"),
    ("[sweep]\nvariants = ['standard/eager']\nseq_lens = [64]\n[params.lokal]\nwindow = 4\n", "lokal"),
    ("[sweep]\nvariants = ['local/blocked']\nseq_lens = [64]\n[params.local]\nwindow = -1\n", "window=-1"),
    ("[sweep]\nvariants = ['local/blocked']\nseq_lens = [64]\n[params.local]\nwidth = 4\n", "width"),
    ("[sweep]\nvariants = ['standard/eager']\nseq_lens = [64]\n[measure]\nmin_reps = 0\n", "min_reps"),
    ("[sweep]\nvariants = ['standard/eager']\nseq_lens = [64]\ncausal = ['yes']\n", "causal"),
    ("[sweep]\nvariants = ['standard/eager']\nseq_lens = 'long'\n", "seq_lens"),
    ("[nonsense]\nx = 1\n", "nonsense"),
    ("[sweep]\nvariants = ['standard/eager']\nseq_lens = [64]\nkv_heads = [1]\ngqa_ratios = [4]\n",
     "kv_heads or gqa_ratios, not both"),
    ("[sweep]\nvariants = ['standard/eager']\nseq_lens = [64]\nkv_heads = 1\n", "kv_heads must be a list"),
    ("[sweep]\nvariants = ['standard/eager']\nseq_lens = [64]\n[documents]\nsize = 3\n", "documents.size"),
    ("[sweep]\nvariants = ['standard/eager']\nseq_lens = [64]\nmodes = ['decode']\n[decode]\nlayouts = ['x']\n",
     "decode.layouts"),
]


@pytest.mark.parametrize("text,named", BAD_TOML, ids=[n for _, n in BAD_TOML])
def test_bad_config_exit_2(tmp_path, text, named):
    config = tmp_path / "spec.toml"
    config.write_text(text)
    result = CliRunner().invoke(app, ["run", "sweep", "--config", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert not (tmp_path / "out").exists()


def test_out_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    result = CliRunner().invoke(app, ["run", "sweep", "--variants", "standard/eager", "--seq-lens", "64",
                                      "--device", "cpu", "--out", str(target)])
    assert result.exit_code == 2 and "is a file" in result.output
    assert target.read_text() == "keep me"


def test_flags_override_preset_and_grid_expands():
    s = spec.override(replace(spec.load("quick"), slices=()), seq_lens=(128, 64), variants=("local",), modes=("fwd",))
    tasks = plan.expand(spec.validate(s), "cpu")
    impls = {e.impl for e in variants.select("local")}
    assert {t.impl for t in tasks} == impls
    assert len(tasks) == len(impls) * 2  # 2 lengths, 1 mode, 1 causal, 1 dtype, 1 head dim
    assert all(t.point.params["window"] == 64 for t in tasks)  # from the preset's [params.local]
    assert len({t.fields()["key"] for t in tasks}) == len(tasks)


def test_heads_layouts_and_documents_expand_into_points_with_their_columns():
    s = spec.override(spec.SweepSpec(variants=("standard/eager",), seq_lens=(64, 128), heads=8, device="cpu"),
                      gqa_ratios=(1, 4), layouts=("dense", "packed", "padded"),
                      documents={"distribution": "multinomial", "count": 3, "seed": 7})
    tasks = plan.expand(spec.validate(s), "cpu")
    assert len(tasks) == 2 * 3 * 2  # ratios × layouts × lengths
    assert {t.point.n_kv_heads for t in tasks} == {8, 2}
    packed = next(t for t in tasks if t.point.layout == "packed" and t.point.seq_len == 128)
    fields = packed.fields()
    assert (fields["layout"], fields["doc_distribution"], fields["doc_count"], fields["doc_seed"]) == \
        ("packed", "multinomial", 3, 7)
    lengths = json.loads(fields["doc_lengths"])
    assert len(lengths) == 3 and sum(lengths) == 128
    dense = next(t for t in tasks if t.point.layout == "dense" and t.point.n_kv_heads == 8)
    assert "doc_lengths" not in dense.fields() and dense.fields()["kv_heads"] == 8
    assert len({t.fields()["key"] for t in tasks}) == len(tasks)
    assert len({t.group() for t in tasks}) == 6  # sizes of one shape form a group


def test_slices_add_their_grids_and_flags_replace_their_keys_too():
    text = """
[sweep]
variants = ["standard/eager"]
seq_lens = [64]
heads = 4
[[slice]]
variants = ["standard/sdpa-math"]
heads = [8]
kv_heads = [2]
[[slice]]
layouts = ["packed"]
documents = {count = 2, distribution = "equal"}
"""
    loaded = spec.validate(spec.from_toml(text, "t"))
    shapes = {(t.impl, t.point.heads, t.point.n_kv_heads, t.point.layout) for t in plan.expand(loaded, "cpu")}
    assert shapes == {("eager", 4, 4, "dense"), ("sdpa-math", 8, 2, "dense"), ("eager", 4, 4, "packed")}
    packed = next(t for t in plan.expand(loaded, "cpu") if t.point.layout == "packed")
    assert packed.point.documents == variants.Documents("equal", 2, 0)
    flagged = spec.override(loaded, variants=("standard/sdpa-flash",), seq_lens=(32,))
    points = [t.point for t in plan.expand(spec.validate(flagged), "cpu")]
    assert {p.seq_len for p in points} == {32} and len(points) == 3
    bad = "[sweep]\nvariants = ['standard/eager']\nseq_lens = [64]\n[[slice]]\nheads = [4]\nkv_heads = [3]\n"
    with pytest.raises(spec.BadInput, match="slice 1: kv_heads: 3 does not divide heads=4"):
        spec.validate(spec.from_toml(bad, "t"))
    with pytest.raises(spec.BadInput, match="unknown key slice.device"):
        spec.from_toml("[[slice]]\ndevice = 'cpu'\n", "t")


def test_keys_of_earlier_runs_are_kept():
    """A point of the old kind (as many KV heads as heads, dense) keys as it did before schema 3."""
    from bench.store import point_key

    old = {"kind": "kernel", "variant": "standard", "impl": "eager", "params": "{}", "mode": "fwd", "causal": False,
           "batch": 1, "heads": 4, "seq_len": 64, "head_dim": 16, "dtype": "float32", "device": "cpu"}
    assert point_key({**old, "kv_heads": 4, "layout": "dense"}) == point_key(old) == "5e3c5f588fffc54b"
    assert point_key({**old, "kv_heads": 1, "layout": "dense"}) != point_key(old)


@pytest.mark.parametrize("name", spec.preset_names())
def test_every_preset_loads_expands_and_is_named_in_the_help(name):
    """A preset that fails to validate, plans nothing, or is missing from --help is a broken promise."""
    help_text = " ".join(CliRunner().invoke(app, ["run", "sweep", "--help"]).output.split())
    help_text = re.sub(r"-\s+", "-", help_text)  # a name the help wraps at its hyphen
    assert name in help_text
    loaded = spec.load(name)
    if loaded.device == "cuda":  # no CUDA here: the grid is checked on the CPU instead
        loaded = spec.override(loaded, device="cpu")
    assert plan.expand(spec.validate(loaded), "cpu")


def test_flashattention_batch_convention():
    s = spec.validate(spec.load("gpu").__class__(variants=("standard/eager",), seq_lens=(512, 2048),
                                                 tokens=16384, heads=None, hidden=2048,
                                                 head_dims=(64, 128)))
    shapes = {(t.point.seq_len, t.point.batch, t.point.head_dim, t.point.heads) for t in plan.expand(s, "cpu")}
    assert shapes == {(512, 32, 64, 32), (2048, 8, 64, 32), (512, 32, 128, 16), (2048, 8, 128, 16)}


# --- end to end ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path):
    result = bench("run", "sweep", *TINY, "--out", str(tmp_path), "--run-id", "tiny")
    assert result.returncode == 0, result.stderr
    rows = pd.read_parquet(tmp_path / "tiny")
    assert len(rows) == 3 * 2 * 2 and set(rows["status"]) == {"ok"}
    assert (rows["schema_version"] == SCHEMA_VERSION).all()
    assert rows["key"].is_unique
    assert (rows["time_ms_p20"] <= rows["time_ms"]).all() and (rows["time_ms"] <= rows["time_ms_p80"]).all()
    assert (rows["flops"] > 0).all() and (rows["tflops"] > 0).all() and rows["pct_peak"].isna().all()
    assert (rows["err_ref"] < 1e-5).all()
    eager = rows[rows["variant"] == "standard"]
    assert (eager["err_softmax"] < 1e-5).all()  # standard attention is exact softmax attention
    linear = rows[rows["variant"] == "linear-elu1"]
    assert (linear["err_softmax"] > 1e-2).all()  # an approximation is measurably not softmax
    for column in ("device_name", "torch_version", "python_version", "hostname", "harness_version"):
        assert rows[column].notna().all(), column
    fwd_bwd = rows[rows["mode"] == "fwd_bwd"].set_index(["variant", "seq_len"])["flops"]
    fwd = rows[rows["mode"] == "fwd"].set_index(["variant", "seq_len"])["flops"]
    np.testing.assert_allclose(fwd_bwd / fwd, 3.5)


@pytest.mark.slow
def test_resume_after_kill_has_every_key_exactly_once(tmp_path):
    args = ["run", "sweep", *TINY[:2], "--seq-lens", "32,48,64,96,128,160", "--modes", "fwd,fwd_bwd",
            "--device", "cpu", "--heads", "2", "--head-dim", "16", "--out", str(tmp_path), "--run-id", "r"]
    proc = subprocess.Popen([sys.executable, "-c", "from bench.cli import app; app(prog_name='bench')", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "r"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(run.glob("*.parquet"))) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(run.glob("*.parquet")))
    assert 4 <= written < 36, "the kill must land mid-run"
    result = bench(*args, "--resume")
    assert result.returncode == 0, result.stderr
    rows = read_results([run])
    assert len(rows) == 36 and rows["key"].is_unique
    assert "already done (resume)" in result.stderr


@pytest.mark.slow
def test_worker_faults_are_recorded_and_the_sweep_goes_on(tmp_path):
    result = bench("run", "sweep", "--variants", "faulty/abort,faulty/sigkill,faulty/hang,faulty/wrong,"
                   "faulty/huge,standard/eager", "--seq-lens", "32,64", "--device", "cpu", "--timeout-s", "5",
                   "--out", str(tmp_path), "--run-id", "f", env=faulty_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    rows = read_results([tmp_path / "f"]).set_index(["impl", "seq_len"])
    assert rows.loc[("abort", 32), "status"] == "error" and "SIGABRT" in rows.loc[("abort", 32), "reason"]
    assert rows.loc[("sigkill", 32), "status"] == "oom" and "SIGKILL" in rows.loc[("sigkill", 32), "reason"]
    # after an OOM, larger points of the same group are skipped unless --keep-going
    assert rows.loc[("sigkill", 64), "status"] == "skipped"
    assert rows.loc[("hang", 32), "status"] == "timeout"
    assert rows.loc[("wrong", 32), "status"] == "incorrect" and np.isnan(rows.loc[("wrong", 32), "time_ms"])
    assert rows.loc[("huge", 32), "status"] == "oom"
    assert (rows.loc["eager", "status"] == "ok").all()


# --- memory --------------------------------------------------------------------------------------

def _peak(name: str, n: int, params: dict) -> int:
    entry = variants.get(name)
    point = variants.Point(batch=1, heads=2, seq_len=n, head_dim=32, params=entry.resolve(params))
    call, _ = measure.make_call(entry, point)
    call.run()  # fill caches (masks) first, as the harness does with its warm-up
    return CpuDevice().peak_memory(call)


def test_cpu_memory_is_deterministic_and_scales_as_expected():
    lengths = [256, 512, 1024, 2048]
    exponents = {}
    for name, params in (("standard/eager", {}), ("local/blocked", {"window": 32}),
                         ("linear-elu1/linear", {})):
        peaks = [_peak(name, n, params) for n in lengths]
        assert peaks == [_peak(name, n, params) for n in lengths], f"{name}: not deterministic"
        exponents[name] = np.polyfit(np.log(lengths), np.log(peaks), 1)[0]
    assert exponents["standard/eager"] > 1.8, exponents
    assert 0.9 < exponents["local/blocked"] < 1.1, exponents
    assert 0.9 < exponents["linear-elu1/linear"] < 1.1, exponents


@pytest.mark.slow
def test_profile_top_profiles_the_slowest_points(tmp_path):
    result = bench("run", "sweep", "--variants", "standard/eager,linear-elu1/linear", "--seq-lens", "64,256",
                   "--device", "cpu", "--heads", "2", "--head-dim", "16", "--out", str(tmp_path), "--run-id", "p",
                   "--profile-top", "1", "--profile-dir", str(tmp_path / "prof"))
    assert result.returncode == 0, result.stderr
    rows = read_results([tmp_path / "p"])
    slowest = rows.sort_values("time_ms").iloc[-1]
    profiles = __import__("json").loads((tmp_path / "p" / "_profiles.json").read_text())
    assert list(profiles) == [slowest["key"]]
    folder = Path(profiles[slowest["key"]])
    assert (folder / "trace.json").is_file() and (folder / "kernels.csv").is_file()


def test_git_commit_is_marked_dirty_only_when_the_harness_code_changed(tmp_path):
    from bench.env import git_commit

    git = lambda *args: subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c",  # noqa: E731
                                        "user.email=t@t", *args], check=True, capture_output=True)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "a.py").write_text("x = 1\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "r.txt").write_text("old\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "results" / "r.txt").write_text("new\n")  # results are not the harness
    assert git_commit(tmp_path) == head
    (tmp_path / "bench" / "b.py").write_text("y = 1\n")  # a new, untracked module
    git_commit.cache_clear()
    assert git_commit(tmp_path) == head + "+dirty"
    (tmp_path / "bench" / "b.py").unlink()
    (tmp_path / "bench" / "a.py").write_text("x = 2\n")
    git_commit.cache_clear()
    assert git_commit(tmp_path) == head + "+dirty"
    assert git_commit(tmp_path / "missing") is None  # not a checkout: no commit to name


def test_after_an_oom_only_points_at_least_as_large_are_skipped():
    from bench.runner import at_least_as_large

    failed = variants.Point(seq_len=4096, batch=8)
    assert at_least_as_large(variants.Point(seq_len=8192, batch=8), failed)
    assert at_least_as_large(variants.Point(seq_len=8192, batch=4), failed)  # the same tokens, longer
    assert not at_least_as_large(variants.Point(seq_len=8192, batch=1), failed)  # decode's batch 1 after 8
    assert not at_least_as_large(variants.Point(seq_len=2048, batch=64), failed)  # shorter
