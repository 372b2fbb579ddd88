"""Sweep spec: a preset or TOML file, overlaid with command-line flags, validated before anything runs.

TOML layout (every key optional except where a preset supplies it)::

    [sweep]
    variants = ["standard", "local/blocked"]   # variant (all impls) or variant/impl
    seq_lens = [512, 1024]
    batch_sizes = [1]        # or: tokens = 16384 (batch = tokens // seq_len, FlashAttention's convention)
    heads = 4                # or a list [32, 64]; or: hidden = 2048 (heads = hidden // head_dim)
    kv_heads = [8, 1]        # key/value heads (FlashAttention's nheads_kv); or gqa_ratios = [4] (heads // kv_heads)
    layouts = ["dense"]      # or "packed" (documents packed into rows), "padded" (one per row, padded)
    head_dims = [64]
    dtypes = ["float32"]
    modes = ["fwd", "fwd_bwd"]  # or "bwd", "decode"
    causal = [false]
    device = "auto"
    timeout_s = 300

    [documents]              # how packed and padded rows split into documents (variants.layouts)
    distribution = "uniform" # equal, uniform (FlashInfer's), multinomial (tritonbench's)
    count = 8                # documents per row
    seed = 0

    [decode]                 # the points of mode "decode" (a step against a cache of seq_len):
    seq_lens = [4096, 65536] # their own grid, the rest as in [sweep]
    q_len = 1                # new tokens per step
    layouts = ["packed"]     # a serving batch: each sequence's cache length from [documents]'
                             # distribution (packed: ragged, padded: padded to the longest)

    [params.local]           # parameters of a variant, overriding its defaults
    window = 64

    [measure]                # how long to time each point
    target_s = 0.1

    [slurm]                  # for --executor slurm (bench.executors.SlurmOptions)
    partition = "gpu"

    [[slice]]                # more points: the [sweep] grid with these keys replaced (as flags replace
    variants = ["standard"]  # them: in both grids), its own [documents] fields under documents = {...}
    heads = [32]
    kv_heads = [8, 1]
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

import variants
from variants.layouts import DISTRIBUTIONS, LAYOUTS, Documents
from variants.registry import DECODE, DTYPES, MODES, is_int_at_least

from .errors import BadInput
from .measure import MeasureSettings

# Sizes past these are typos, not experiments (and would overflow index arithmetic or the allocator).
LIMITS = {"seq_lens": 1 << 22, "batch_sizes": 1 << 16, "heads": 1024, "head_dims": 1024,
          "tokens": 1 << 26, "hidden": 1 << 16, "q_len": 1 << 12, "kv_heads": 1024, "gqa_ratios": 1024,
          "count": 1 << 16}
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DecodeGrid:
    """The grid of the decode points (when ``modes`` holds "decode"): a cache length worth timing a
    step against is not a length worth a full forward. What it leaves out is the sweep's."""

    variants: tuple[str, ...] | None = None
    seq_lens: tuple[int, ...] | None = None  # cache lengths n
    batch_sizes: tuple[int, ...] | None = None
    q_len: int = 1  # new tokens per step
    layouts: tuple[str, ...] | None = None  # ragged batches: packed (native), padded (to the longest)


@dataclass(frozen=True)
class SweepSpec:
    variants: tuple[str, ...] = ()
    seq_lens: tuple[int, ...] = ()
    batch_sizes: tuple[int, ...] = (1,)
    tokens: int | None = None
    heads: int | tuple[int, ...] | None = 4  # one count or a list
    hidden: int | None = None
    kv_heads: tuple[int, ...] | None = None  # None: as many as heads
    gqa_ratios: tuple[int, ...] | None = None  # heads // kv_heads, the alternative to kv_heads
    layouts: tuple[str, ...] = ("dense",)
    documents: Documents = field(default_factory=Documents)
    head_dims: tuple[int, ...] = (64,)
    dtypes: tuple[str, ...] = ("float32",)
    modes: tuple[str, ...] = ("fwd",)
    causal: tuple[bool, ...] = (False,)
    device: str = "auto"
    timeout_s: float = 600.0
    keep_going: bool = False
    params: dict[str, dict[str, int]] = field(default_factory=dict)
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    slurm: dict[str, Any] = field(default_factory=dict)  # job settings, see bench.executors.SlurmOptions
    decode: DecodeGrid = field(default_factory=DecodeGrid)
    # Further grids: each replaces some keys of this one (as command-line flags do), [[slice]] in TOML.
    slices: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_TABLES = ("sweep", "params", "measure", "slurm", "decode", "documents", "slice")
_SWEEP_KEYS = {f.name for f in fields(SweepSpec)} - set(_TABLES) - {"slices"}
# What a slice may replace: the grid, not how the run goes (device, time limits).
_SLICE_KEYS = (_SWEEP_KEYS - {"device", "timeout_s", "keep_going"}) | {"documents", "q_len"}
_LIST_KEYS = {"variants", "seq_lens", "batch_sizes", "heads", "head_dims", "dtypes", "modes", "causal", "kv_heads",
              "gqa_ratios", "layouts"}
_EITHER_KEYS = {"heads"}  # one value or a list
_MEASURE_KEYS = {f.name for f in fields(MeasureSettings)}
_DECODE_KEYS = {f.name for f in fields(DecodeGrid)}
_DOCUMENT_KEYS = {f.name for f in fields(Documents)}
# Flags that replace a value in both grids (a length given on the command line is every length).
_SHARED_KEYS = ("variants", "seq_lens", "batch_sizes", "layouts")


def _presets(folder: str):
    """``bench/presets/<folder>`` (kernel sweeps at the top, ``train/``) as a package resource."""
    root = resources.files("bench.presets")
    return root.joinpath(folder) if folder else root


def preset_names(folder: str = "") -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in _presets(folder).iterdir() if p.name.endswith(".toml"))


def read_toml(preset: str | None, config: Path | None, folder: str = "") -> tuple[dict[str, Any], str] | None:
    """The parsed TOML of a packaged preset or of a file (not both), with where it came from for
    messages; None when neither is given."""
    if preset and config:
        raise BadInput("give --preset or --config, not both")
    if config is not None:
        if not config.is_file():
            raise BadInput(f"config file {str(config)!r} does not exist or is not a file")
        try:
            text, origin = config.read_text(), str(config)
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"config file {str(config)!r} cannot be read ({exc})") from None
    elif preset is None:
        return None
    elif preset not in preset_names(folder):
        raise BadInput(f"unknown {folder + ' ' if folder else ''}preset {preset!r} "
                       f"(valid: {', '.join(preset_names(folder))})")
    else:
        text, origin = _presets(folder).joinpath(f"{preset}.toml").read_text(), f"preset {preset}"
    return parse_toml(text, origin), origin


def parse_toml(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{origin}: malformed TOML ({exc})") from None


def load(preset: str | None = None, config: Path | None = None) -> SweepSpec:
    """The spec from a packaged preset or a TOML file (not both)."""
    found = read_toml(preset, config)
    return SweepSpec() if found is None else from_data(*found)


def from_toml(text: str, origin: str) -> SweepSpec:
    return from_data(parse_toml(text, origin), origin)


def _table_values(table: dict[str, Any], name: str, keys: set[str], origin: str) -> dict[str, Any]:
    """A table's values with lists as tuples; BadInput on an unknown key or a list/scalar mix-up."""
    for key, value in table.items():
        if key not in keys:
            raise BadInput(f"{origin}: unknown key {name}.{key} (valid: {', '.join(sorted(keys))})")
        if key not in _EITHER_KEYS and (key in _LIST_KEYS) != isinstance(value, list):
            shape = "a list" if key in _LIST_KEYS else "a single value"
            raise BadInput(f"{origin}: {name}.{key} must be {shape}, got {value!r}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}


def _slice_values(table: dict[str, Any], origin: str) -> dict[str, Any]:
    values = _table_values({k: v for k, v in table.items() if k != "documents"}, "slice", _SLICE_KEYS, origin)
    documents = table.get("documents")
    if documents is not None:
        if not isinstance(documents, dict):
            raise BadInput(f"{origin}: slice.documents must be a table")
        values["documents"] = _table_values(documents, "slice.documents", _DOCUMENT_KEYS, origin)
    return values


def slices_of(spec: SweepSpec) -> list[SweepSpec]:
    """Each [[slice]] as a spec of its own: this one with the slice's keys replaced."""
    base = replace(spec, slices=())
    return [override(base, **values) for values in spec.slices]


def from_data(data: dict[str, Any], origin: str) -> SweepSpec:
    unknown = set(data) - set(_TABLES)
    if unknown:
        raise BadInput(f"{origin}: unknown table {sorted(unknown)[0]!r} (valid: {', '.join(_TABLES)})")
    for name in _TABLES:
        if name != "slice" and not isinstance(data.get(name, {}), dict):
            raise BadInput(f"{origin}: [{name}] must be a table")
    slices = data.get("slice", [])
    if not isinstance(slices, list) or not all(isinstance(s, dict) for s in slices):
        raise BadInput(f"{origin}: slice must be an array of tables ([[slice]])")
    params, measure = data.get("params", {}), data.get("measure", {})
    for key in measure:
        if key not in _MEASURE_KEYS:
            raise BadInput(f"{origin}: unknown key measure.{key} (valid: {', '.join(sorted(_MEASURE_KEYS))})")
    for variant, table in params.items():
        if not isinstance(table, dict):
            raise BadInput(f"{origin}: params.{variant} must be a table of parameter = value")
    values = _table_values(data.get("sweep", {}), "sweep", _SWEEP_KEYS, origin)
    decode = _table_values(data.get("decode", {}), "decode", _DECODE_KEYS, origin)
    documents = _table_values(data.get("documents", {}), "documents", _DOCUMENT_KEYS, origin)
    if "tokens" in values and "batch_sizes" not in values:
        values["batch_sizes"] = ()
    if "hidden" in values and "heads" not in values:
        values["heads"] = None
    try:
        return SweepSpec(**values, params={k: dict(v) for k, v in params.items()},
                         measure=MeasureSettings(**measure), slurm=dict(data.get("slurm", {})),
                         decode=DecodeGrid(**decode), documents=Documents(**documents),
                         slices=tuple(_slice_values(s, origin) for s in slices))
    except TypeError as exc:
        raise BadInput(f"{origin}: {exc}") from None


def override(spec: SweepSpec, q_len: int | None = None, documents: dict[str, Any] | None = None,
             **flags: Any) -> SweepSpec:
    """Flags given on the command line (not None) win over the file, in both grids; ``documents``
    replaces the fields of [documents] it gives."""
    given = {k: v for k, v in flags.items() if v is not None}
    if "batch_sizes" in given:
        given["tokens"] = None
    if "heads" in given:
        given["hidden"] = None
    if given.keys() & {"kv_heads", "gqa_ratios"}:  # one of them on the command line replaces the file's
        given = {"kv_heads": None, "gqa_ratios": None, **given}
    given_documents = {k: v for k, v in (documents or {}).items() if v is not None}
    if given_documents:
        given["documents"] = replace(spec.documents, **given_documents)
    if spec.slices and (given or given_documents or q_len is not None):  # a flag is every slice's value too
        replaced = {*given, *(("documents",) if given_documents else ()), *(("q_len",) if q_len is not None else ())}
        given["slices"] = tuple({k: v for k, v in s.items() if k not in replaced} for s in spec.slices)
    decode = replace(spec.decode, **{k: None for k in _SHARED_KEYS if k in given},
                     **({"q_len": q_len} if q_len is not None else {}))
    result = replace(spec, **given, decode=decode)
    if q_len is not None and DECODE not in result.modes:
        raise BadInput(f"--q-len {q_len} applies to decode points: add decode to --modes")
    return result


def parse_list(text: str | None, name: str, convert: type = str) -> tuple | None:
    """``"512,1024"`` -> (512, 1024); BadInput names the item that does not parse."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise BadInput(f"--{name} is empty")
    try:
        return tuple(convert(t) for t in items)
    except ValueError:
        bad = next(t for t in items if not _parses(t, convert))
        raise BadInput(f"--{name}: {bad!r} is not a valid {convert.__name__}") from None


def _parses(text: str, convert: type) -> bool:
    try:
        convert(text)
        return True
    except ValueError:
        return False


def _positive_ints(name: str, values: Any, label: str | None = None) -> None:
    """``values`` (a list for list keys, else one value) are positive integers within ``LIMITS[name]``;
    messages call it ``label`` (default ``name``)."""
    label = label or name
    if (name in _LIST_KEYS) != isinstance(values, tuple):
        shape = "a list of positive integers" if name in _LIST_KEYS else "one positive integer"
        raise BadInput(f"{label} must be {shape}, got {values!r}")
    values = values if isinstance(values, tuple) else (values,)
    if not values:
        raise BadInput(f"{label} is empty")
    for value in values:
        if not is_int_at_least(value, 1):
            raise BadInput(f"{label}: {value!r} is not a positive integer")
        if value > LIMITS[name]:
            raise BadInput(f"{label}: {value} is larger than the limit {LIMITS[name]}")


def _choices(name: str, values: Any, valid: tuple[str, ...]) -> None:
    if not isinstance(values, tuple) or not values:
        raise BadInput(f"{name} must be a non-empty list (valid items: {', '.join(valid)})")
    for value in values:
        if value not in valid:
            raise BadInput(f"{name}: unknown value {value!r} (valid: {', '.join(valid)})")


def check_device_name(device: Any) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; BadInput names anything else."""
    index = device.removeprefix("cuda:") if isinstance(device, str) and device.startswith("cuda:") else None
    if not isinstance(device, str) or (device not in DEVICES and not (index and index.isdigit())):
        raise BadInput(f"unknown device {device!r} (valid: {', '.join(DEVICES)}, cuda:N)")


def validate_device_and_dtype(device: Any, dtype: str | None = None) -> None:
    check_device_name(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"device {device!r} requested but no CUDA device is available (try --device cpu)")
    if dtype is not None and dtype not in DTYPES:
        raise BadInput(f"unknown dtype {dtype!r} (valid: {', '.join(DTYPES)})")


def validate(spec: SweepSpec) -> SweepSpec:
    """Check everything a sweep needs before anything is written; BadInput names the bad value."""
    _validate_variants(spec.variants, "variants")
    _positive_ints("seq_lens", spec.seq_lens)
    if spec.tokens is not None:
        _positive_ints("tokens", spec.tokens)
    else:
        _positive_ints("batch_sizes", spec.batch_sizes)
    if spec.hidden is not None:
        _positive_ints("hidden", spec.hidden)
    else:
        _positive_ints("heads", spec.heads if isinstance(spec.heads, tuple) else (spec.heads,))
    _positive_ints("head_dims", spec.head_dims)
    _validate_decode(spec.decode)
    _choices("dtypes", spec.dtypes, tuple(DTYPES))
    _choices("modes", spec.modes, MODES)
    if not isinstance(spec.causal, tuple) or not spec.causal or any(not isinstance(c, bool) for c in spec.causal):
        raise BadInput(f"causal must be a list of true/false, got {spec.causal!r}")
    validate_device_and_dtype(spec.device)
    if not finite_number(spec.timeout_s) or spec.timeout_s <= 0:
        raise BadInput(f"timeout_s: {spec.timeout_s!r} must be a positive number of seconds")
    if not isinstance(spec.keep_going, bool):
        raise BadInput(f"keep_going: {spec.keep_going!r} must be true or false")
    if spec.hidden is not None:
        for head_dim in spec.head_dims:
            if spec.hidden % head_dim:
                raise BadInput(f"hidden={spec.hidden} is not a multiple of head_dim={head_dim}")
    _validate_heads(spec)
    _validate_layouts(spec)
    _validate_params(spec)
    _validate_measure(spec.measure)
    for number, sliced in enumerate(slices_of(spec), 1):
        try:
            validate(sliced)
        except BadInput as exc:
            raise BadInput(f"slice {number}: {exc}") from None
    return spec


def heads_of(spec: SweepSpec, head_dim: int) -> list[int]:
    """The query head counts of a grid with ``head_dim`` (hidden // head_dim, or the heads given)."""
    if spec.hidden:
        return [spec.hidden // head_dim]
    return list(spec.heads) if isinstance(spec.heads, tuple) else [spec.heads]


def kv_heads_of(spec: SweepSpec, heads: int) -> list[int | None]:
    """The key/value head counts of a grid with ``heads`` query heads (None: as many)."""
    if spec.kv_heads:
        return list(spec.kv_heads)
    if spec.gqa_ratios:
        return [heads // ratio for ratio in spec.gqa_ratios]
    return [None]


def _validate_heads(spec: SweepSpec) -> None:
    if spec.kv_heads is not None and spec.gqa_ratios is not None:
        raise BadInput("give kv_heads or gqa_ratios, not both")
    for name in ("kv_heads", "gqa_ratios"):
        if getattr(spec, name) is not None:
            _positive_ints(name, getattr(spec, name))
    for head_dim in spec.head_dims:
        for heads in heads_of(spec, head_dim):
            for ratio in spec.gqa_ratios or ():
                if heads % ratio:
                    raise BadInput(f"gqa_ratios: {ratio} does not divide heads={heads}")
            for kv_heads in kv_heads_of(spec, heads):
                if kv_heads is not None and heads % kv_heads:
                    raise BadInput(f"kv_heads: {kv_heads} does not divide heads={heads} (each key/value head "
                                   "serves an equal group of query heads)")


def _validate_layouts(spec: SweepSpec) -> None:
    _choices("layouts", spec.layouts, LAYOUTS)
    if spec.decode.layouts is not None:
        _choices("decode.layouts", spec.decode.layouts, LAYOUTS)
    documents = spec.documents
    if documents.distribution not in DISTRIBUTIONS:
        raise BadInput(f"documents.distribution: unknown value {documents.distribution!r} "
                       f"(valid: {', '.join(DISTRIBUTIONS)})")
    _positive_ints("count", documents.count, "documents.count")
    if not is_int_at_least(documents.seed, 0):
        raise BadInput(f"documents.seed: {documents.seed!r} must be an integer >= 0")
    full = [mode for mode in spec.modes if mode != DECODE]
    if full and any(layout != "dense" for layout in spec.layouts) and documents.count > min(spec.seq_lens):
        raise BadInput(f"documents.count: {documents.count} documents do not fit in a row of "
                       f"{min(spec.seq_lens)} tokens")


def _validate_variants(selectors: Any, name: str) -> None:
    if not isinstance(selectors, tuple) or not selectors:
        raise BadInput(f"no {name} selected (use --variants or a preset)")
    for selector in selectors:
        if not isinstance(selector, str):
            raise BadInput(f"{name}: {selector!r} is not a name")
        try:
            variants.select(selector)
        except KeyError as exc:
            raise BadInput(str(exc.args[0])) from None


def _validate_decode(grid: DecodeGrid) -> None:
    if grid.variants is not None:
        _validate_variants(grid.variants, "decode.variants")
    for name in ("seq_lens", "batch_sizes"):
        if getattr(grid, name) is not None:
            _positive_ints(name, getattr(grid, name), f"decode.{name}")
    _positive_ints("q_len", grid.q_len)


def _validate_params(spec: SweepSpec) -> None:
    # Parameters of variants that are not selected are ignored (a preset sets many), but they must
    # still name a real variant and real parameters.
    for variant, params in spec.params.items():
        try:
            impls = variants.select(variant)
        except KeyError as exc:
            raise BadInput(f"params.{variant}: {exc.args[0]}") from None
        if not isinstance(params, dict):
            raise BadInput(f"params.{variant} must be a table of parameter = value")
        known = sorted({name for e in impls for name in e.params})
        for name in params:
            if name not in known:
                raise BadInput(f"params.{variant}: {variant} has no parameter {name!r} (valid: "
                               f"{', '.join(known) or 'none'})")
        try:
            for entry in impls:
                entry.resolve_variant_params(params)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
    for selector in (*spec.variants, *(spec.decode.variants or ())):
        if "/" not in selector:
            continue  # a whole variant: impls that cannot take a head dim get `unsupported` rows
        caps = variants.get(selector).caps
        for head_dim in spec.head_dims:
            reasons = caps.head_dim_reasons(head_dim)
            if reasons:
                raise BadInput(f"{selector} cannot take head_dim={head_dim}: {'; '.join(reasons)}")


def finite_number(value: Any) -> bool:
    """An int or float (not a bool), neither inf nor nan."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _validate_measure(m: MeasureSettings) -> None:
    for name in ("warmup_s", "target_s", "noisy_spread"):
        value = getattr(m, name)
        if not finite_number(value) or value < 0:
            raise BadInput(f"measure.{name}: {value!r} must be a non-negative number")
    for name in ("min_reps", "max_reps", "check_len"):
        value = getattr(m, name)
        if not is_int_at_least(value, 1):
            raise BadInput(f"measure.{name}: {value!r} must be a positive integer")
    if m.min_reps > m.max_reps:
        raise BadInput(f"measure.min_reps={m.min_reps} exceeds measure.max_reps={m.max_reps}")
    if not isinstance(m.cuda_graph, bool):
        raise BadInput(f"measure.cuda_graph: {m.cuda_graph!r} must be true or false")
    if m.max_mem_gb is not None and (not finite_number(m.max_mem_gb) or m.max_mem_gb <= 0):
        raise BadInput(f"measure.max_mem_gb: {m.max_mem_gb!r} must be a positive number")
