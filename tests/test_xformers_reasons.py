"""Why an xformers row does not run: the C++ extension's build mismatch first (read from xformers'
own build info), else each refusing operator with its first reason whole. CPU only."""

from __future__ import annotations

import json
import re
from types import ModuleType

import pytest
import torch
from support import why_not
from typer.testing import CliRunner

import variants
from bench.cli import app
from variants import Point, xformers_ops

XFORMERS_ROWS = ("standard/xformers", "local/xformers")


def cpu_reason(name: str, causal: bool = False) -> str:
    entry = variants.get(name)
    return why_not(entry, Point(device="cpu", dtype="float32", causal=causal, params=entry.resolve()))


def minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


@pytest.fixture
def cpp_lib() -> ModuleType:
    """xformers' loader module, whose exception classes and build info the fakes are made of."""
    return pytest.importorskip("xformers._cpp_lib")


@pytest.fixture
def real_load_failure(cpp_lib: ModuleType) -> BaseException:
    """The installed xformers' own record of its extension failing to load, with a torch named."""
    exc = cpp_lib._cpp_library_load_exception
    if getattr(exc, "build_info", None) is None:
        pytest.skip("xformers' C++ extension loads here, or its failure names no torch")
    return exc


def build_info(cpp_lib: ModuleType, torch_version: str) -> object:
    return cpp_lib._BuildInfo({"version": {"torch": torch_version, "cuda": 1208, "hip": None,
                                           "python": "3.10.19"}, "env": {}})


def fake_load_exception(monkeypatch: pytest.MonkeyPatch, exc: BaseException | None) -> None:
    monkeypatch.setattr(xformers_ops, "_xformers_load_exception", lambda: exc)


# --- the installed xformers (its extension, built for another torch, does not load here) ----------

@pytest.mark.parametrize("name", XFORMERS_ROWS)
@pytest.mark.parametrize("causal", [False, True])
def test_real_mismatch_leads_the_reason(real_load_failure, name, causal):
    import xformers

    built = real_load_failure.build_info.torch_version
    reason = cpu_reason(name, causal)
    assert reason.startswith(f"xformers {xformers.__version__} was built for torch {built} "
                             f"but this is torch {torch.__version__}")
    assert built.split("+")[0] in reason
    assert reason.endswith(f"install the xformers build for this torch, "
                           f"or torch {minor(built)} for xformers {xformers.__version__}")
    assert len(reason) <= xformers_ops.XFORMERS_LEAD_LIMIT and "\n" not in reason


def test_bench_list_json_shows_the_mismatch(real_load_failure):
    result = CliRunner().invoke(app, ["list", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = {f"{r['variant']}/{r['impl']}": r for r in json.loads(result.stdout)}
    built = real_load_failure.build_info.torch_version
    for name in XFORMERS_ROWS:
        assert not rows[name]["available"]
        assert f"was built for torch {built} but this is torch {torch.__version__}" in rows[name]["reason"]


# --- fake load failures ------------------------------------------------------------------------------

def test_invalid_lib_with_build_info_names_both_torches_and_the_fix(monkeypatch, cpp_lib):
    import xformers

    fake_load_exception(monkeypatch, cpp_lib.xFormersInvalidLibException(build_info(cpp_lib, "2.99.1+cu131")))
    for name in XFORMERS_ROWS:
        reason = cpu_reason(name)
        assert "built for torch 2.99.1+cu131 but this is torch " + torch.__version__ in reason
        assert reason.endswith("or torch 2.99 for xformers " + xformers.__version__)
        assert len(reason) <= xformers_ops.XFORMERS_LEAD_LIMIT


def test_invalid_lib_without_build_info_falls_back_to_xformers_words(monkeypatch, cpp_lib):
    fake_load_exception(monkeypatch, cpp_lib.xFormersInvalidLibException(None))
    reason = cpu_reason("standard/xformers")
    assert f"did not load with torch {torch.__version__}" in reason
    assert "install the xformers build for this torch" in reason
    assert "built for a different version of PyTorch or Python" in reason  # xformers' own words
    assert len(reason) <= xformers_ops.XFORMERS_LEAD_LIMIT and "\n" not in reason


def test_build_for_this_very_torch_is_not_called_a_torch_mismatch(monkeypatch, cpp_lib):
    """Built for this torch yet not loaded (another Python, a missing CUDA library): no "built for
    torch X but this is torch X"; xformers' own words, which name the Python, are kept."""
    fake_load_exception(monkeypatch, cpp_lib.xFormersInvalidLibException(build_info(cpp_lib, torch.__version__)))
    reason = cpu_reason("local/xformers")
    assert "but this is torch" not in reason and "xFormers was built for" in reason
    assert len(reason) <= xformers_ops.XFORMERS_LEAD_LIMIT


def test_not_built_falls_back_to_xformers_words(monkeypatch, cpp_lib):
    fake_load_exception(monkeypatch, cpp_lib.xFormersWasNotBuiltException())
    reason = cpu_reason("local/xformers", causal=True)
    assert f"did not load with torch {torch.__version__}" in reason
    assert "Need to compile C++ extensions" in reason
    assert len(reason) <= xformers_ops.XFORMERS_LEAD_LIMIT


def test_an_exception_of_another_xformers_is_read_defensively(monkeypatch, cpp_lib):
    class Other(Exception):
        build_info = object()  # no torch_version

    fake_load_exception(monkeypatch, Other("extension\n   mismatch"))
    assert cpu_reason("standard/xformers").endswith("xformers: extension mismatch")


def test_loaded_extension_lists_the_operators_reasons(monkeypatch, cpp_lib):
    """No load failure: the dispatcher's own refusal, per operator (ckF on a CPU torch)."""
    fake_load_exception(monkeypatch, None)
    reason = cpu_reason("local/xformers")
    assert re.match(r"xformers has no operator for this input: [^:]+: device=cpu", reason)
    assert "attn_bias type is LocalAttentionFromBottomRightMask" in reason  # the class, named short
    assert len(reason) <= xformers_ops.XFORMERS_REASON_LIMIT


# --- the dispatcher's message ------------------------------------------------------------------------

INPUTS = """     query       : shape=(1, 16, 1, 64) (torch.float32)
     key         : shape=(1, 16, 1, 64) (torch.float32)
     value       : shape=(1, 16, 1, 64) (torch.float32)
     attn_bias   : <class 'xformers.ops.fmha.attn_bias.LocalAttentionFromBottomRightMask'>
     p           : 0.0"""
BIAS = "attn_bias type is <class 'xformers.ops.fmha.attn_bias.LocalAttentionFromBottomRightMask'>"
DTYPE = "dtype=torch.float32 (supported: {torch.bfloat16, torch.float16})"
NOT_BUILT = "operator wasn't built - see `python -m xformers.info` for more info"
# The shape of xformers.ops.fmha.dispatch._run_priority_list's message on a CUDA machine whose
# extension loaded: per operator "`NAME` is not supported because:" then one reason a line.
REFUSALS = [
    ("fa3F@0.0.0", ["requires device with capability >= (9, 0) but your GPU has capability (8, 6) (too old)",
                    DTYPE, BIAS, NOT_BUILT]),
    ("fa2F@2.5.7-pt", [DTYPE, BIAS]),
    ("cutlassF-pt", [BIAS]),
    ("cutlassF-blackwell", ["requires device with capability >= (10, 0) but your GPU has capability "
                            "(8, 6) (too old)", DTYPE, BIAS, NOT_BUILT]),
    ("triton_splitKF", [DTYPE, BIAS, "query.shape[1] > 16 (only decoding supported)"]),
]
MESSAGE = "No operator found for `memory_efficient_attention_forward` with inputs:\n" + INPUTS + "".join(
    f"\n`{op}` is not supported because:\n    " + "\n    ".join(reasons) for op, reasons in REFUSALS)


def short(reason: str) -> str:
    return reason.replace("<class 'xformers.ops.fmha.attn_bias.", "").replace("'>", "")


def test_short_message_lists_every_reason_of_every_operator():
    three = MESSAGE[:MESSAGE.index("\n`cutlassF-blackwell`")]
    assert xformers_ops.xformers_operator_reasons(three) == "; ".join(
        f"{op}: {', '.join(short(r) for r in reasons)}" for op, reasons in REFUSALS[:3])


def test_long_message_keeps_each_operators_first_reason_whole():
    text = xformers_ops.xformers_operator_reasons(MESSAGE)
    assert len(MESSAGE) > xformers_ops.XFORMERS_REASON_LIMIT >= len(text) and "…" not in text
    assert text == (f"fa3F@0.0.0: {REFUSALS[0][1][0]}; fa2F@2.5.7-pt, triton_splitKF: {DTYPE}; "
                    f"cutlassF-pt: {short(BIAS)}; cutlassF-blackwell: {REFUSALS[3][1][0]}")


def test_operators_refusing_alike_share_their_reason_and_the_rest_are_counted():
    text = xformers_ops.xformers_operator_reasons(MESSAGE, limit=220)
    assert text == f"fa3F@0.0.0: {REFUSALS[0][1][0]}; fa2F@2.5.7-pt, triton_splitKF: {DTYPE}; +2 more operators"
    assert xformers_ops.xformers_operator_reasons(MESSAGE, limit=300).endswith(f"{short(BIAS)}; +1 more operator")


def test_the_parser_reads_xformers_own_formatting():
    """Guards against the message's shape drifting away from what the parser reads."""
    dispatch = pytest.importorskip("xformers.ops.fmha.dispatch")
    from xformers.ops.fmha.common import Inputs

    x = torch.zeros(1, 16, 1, 64)
    ops = [type("Op", (), {"NAME": op, "not_supported_reasons": staticmethod(lambda inp, r=reasons: r)})
           for op, reasons in REFUSALS]
    with pytest.raises(NotImplementedError) as raised:
        dispatch._run_priority_list("memory_efficient_attention_forward", ops, Inputs(query=x, key=x, value=x))
    assert xformers_ops.xformers_operator_reasons(str(raised.value)) == xformers_ops.xformers_operator_reasons(MESSAGE)


def test_a_message_of_another_shape_is_condensed():
    assert xformers_ops.xformers_operator_reasons("CUDA error:\n  no kernel image", limit=20) == "CUDA error: no kern…"
