"""Published figures the report compares against (docs/published-figures.md): throughput curves
drawn as reference lines, and the GELU approximations' errors shown beside the measured ones.

Each curve is drawn only in a panel it applies to — a device model it holds for (matched in the run's
device_name, as bench.env matches peaks), the same mode, causal, head dim and a 16-bit dtype, and
multi-head attention on a dense batch (the report keeps them off grouped-head and packed panels) — and
its legend entry names the device it was measured on and the source. H100 figures hold for the H200 too:
the same SMs at the same clocks (989.4 dense BF16 TFLOP/s for both), the H200 has more and faster
memory, which compute-bound attention does not need. All figures use the FlashAttention benchmark convention: batch = 16384 / n,
hidden 2048, forward FLOPs 4·n²·d·heads·batch (halved when causal), backward 2.5 × forward.
The GELU errors are max |approximation − exact erf GELU| over the real line.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..env import device_peaks

FA2_FIG7 = "FlashAttention-2 paper, Fig. 7"
FA3_FIG5 = "FlashAttention-3 paper, Fig. 5"
SIXTEEN_BIT = ("float16", "bfloat16")


# The device a published curve was measured on -> the models (peak table rows) it holds for.
APPLIES_TO = {"H100": ("H100", "H200", "GH200")}
MEASURED_ON = {"H100": "H100 SXM"}


@dataclass(frozen=True)
class Reference:
    impl: str
    source: str
    device: str  # the device model it was measured on
    mode: str
    causal: bool
    head_dim: int
    seq_lens: tuple[int, ...]
    tflops: tuple[float, ...]
    dtypes: tuple[str, ...] = SIXTEEN_BIT

    @property
    def label(self) -> str:
        return f"{self.impl} on {MEASURED_ON.get(self.device, self.device)}, published ({self.source})"

    def matches(self, device_name: str, mode: str, causal: bool, head_dim: int, dtype: str) -> bool:
        models = APPLIES_TO.get(self.device, (self.device,))
        part = device_peaks(device_name)  # the parts the peak table knows: no PCIe or NVL variant
        return (part is not None and part.model in models and (self.mode, self.causal, self.head_dim)
                == (mode, causal, head_dim) and dtype in self.dtypes)


_FA2_N = (512, 1024, 2048, 4096, 8192, 16384)
_FA3_N = (512, 2048, 8192, 16384)

REFERENCES: tuple[Reference, ...] = (
    # Forward + backward on H100 (FA2 paper Fig. 7); plain PyTorch runs out of memory at 16k.
    Reference("FA2", FA2_FIG7, "H100", "fwd_bwd", False, 64, _FA2_N, (215, 254, 274, 288, 294, 296)),
    Reference("PyTorch", FA2_FIG7, "H100", "fwd_bwd", False, 64, _FA2_N[:5], (62, 72, 81, 86, 87)),
    Reference("FA2", FA2_FIG7, "H100", "fwd_bwd", False, 128, _FA2_N, (248, 294, 320, 326, 335, 338)),
    Reference("PyTorch", FA2_FIG7, "H100", "fwd_bwd", False, 128, _FA2_N[:5], (93, 120, 145, 160, 167)),
    Reference("FA2", FA2_FIG7, "H100", "fwd_bwd", True, 128, _FA2_N, (163, 221, 265, 294, 308, 328)),
    # Forward only on H100 (FA3 paper Fig. 5): FA2, cuDNN and FA3.
    Reference("FA2", FA3_FIG5, "H100", "fwd", False, 64, _FA3_N, (282, 318, 322, 324)),
    Reference("cuDNN", FA3_FIG5, "H100", "fwd", False, 64, _FA3_N, (335, 395, 412, 413)),
    Reference("FA3", FA3_FIG5, "H100", "fwd", False, 64, _FA3_N, (333, 460, 496, 497)),
    Reference("FA2", FA3_FIG5, "H100", "fwd", False, 128, _FA3_N, (309, 362, 370, 370)),
    Reference("cuDNN", FA3_FIG5, "H100", "fwd", False, 128, _FA3_N, (497, 617, 600, 595)),
    Reference("FA3", FA3_FIG5, "H100", "fwd", False, 128, _FA3_N, (467, 625, 646, 648)),
    Reference("FA2", FA3_FIG5, "H100", "fwd", True, 128, _FA3_N, (191, 298, 333, 335)),
    Reference("cuDNN", FA3_FIG5, "H100", "fwd", True, 128, _FA3_N, (315, 484, 529, 539)),
    Reference("FA3", FA3_FIG5, "H100", "fwd", True, 128, _FA3_N, (292, 521, 602, 616)),
)


def matching(device_names: set[str], mode: str, causal: bool, head_dim: int, dtype: str) -> list[Reference]:
    """Curves measured on the panel's device and configuration; none when the panel mixes devices."""
    if len(device_names) != 1:
        return []
    (device_name,) = device_names
    return [r for r in REFERENCES if r.matches(device_name, mode, causal, head_dim, dtype)]


# --- training tricks -----------------------------------------------------------------------------

GELU_SOURCE = "the GELU paper (Hendrycks & Gimpel 2016), as in docs/published-figures.md"


@dataclass(frozen=True)
class GeluError:
    """Published max |error| of a GELU form against exact (erf) GELU, and the |x| where it peaks."""

    form: str  # as in the results' ``gelu`` column
    max_abs_err: float
    at_abs_x: float
    source: str = GELU_SOURCE


GELU_ERRORS: dict[str, GeluError] = {e.form: e for e in (
    GeluError("tanh", 4.73e-4, 2.70),     # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
    GeluError("sigmoid", 2.03e-2, 2.27),  # x·σ(1.702·x)
)}
