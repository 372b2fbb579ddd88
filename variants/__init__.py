"""attnbench variants: what each attention variant computes (nothing about measuring it).

Tensors are laid out ``(batch, heads, seq, head_dim)`` everywhere.

Your own variants: put ``register(Entry(...))`` calls in a module on your ``PYTHONPATH`` and name it
in ``ATTNBENCH_PLUGINS`` (comma-separated module names); it is imported with the built-ins, in the
command and in every worker process.

>>> import variants
>>> attn = variants.get("local", "blocked")          # or variants.get("local/blocked")
>>> out = attn(q, k, v, causal=True, window=128)
>>> [e.name for e in variants.entries()]
"""

# Registration happens on import; this order is the order of `bench list`.
from . import standard  # noqa: F401, I001
from . import sparse  # noqa: F401
from . import linear  # noqa: F401
from .linear import fla as _linear_fla  # noqa: F401
from . import lowrank  # noqa: F401
from . import gated  # noqa: F401
from .gated import fla as _gated_fla  # noqa: F401
from . import hybrid  # noqa: F401
import importlib as _importlib
import os as _os

from .caches import release_caches
from .layouts import LAYOUTS, Documents, Layout
from .reference import exact_attention, gradient_errors, relative_error
from .registry import DECODE, DTYPES, MODES, Capabilities, Entry, Point, entries, get, register, select, \
    variant_names

for _module in filter(None, (m.strip() for m in _os.environ.get("ATTNBENCH_PLUGINS", "").split(","))):
    _importlib.import_module(_module)

__all__ = ["DECODE", "DTYPES", "LAYOUTS", "MODES", "Capabilities", "Documents", "Entry", "Layout", "Point", "entries",
           "exact_attention", "get", "gradient_errors", "register", "relative_error", "release_caches", "select",
           "variant_names"]
