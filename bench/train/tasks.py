"""Quality tasks for the training sweep: batches of (tokens, labels) with label −100 = not scored.

* ``mqar`` — multi-query associative recall (Zoology): key–value pairs first, then each key once
  more at a random later position among random filler tokens; only the prediction at a queried key
  is scored, and it must be that key's value. Softmax attention solves it; fixed-state linear
  attention struggles. With ``min_pairs`` < ``pairs`` each training sequence holds a random number
  of pairs in [min_pairs, pairs] (Zoology trains on such a mixture), evaluation always ``pairs``.
* ``bytes`` — byte-level language modelling on the Python standard library's own ``.py`` sources
  (a real corpus present on every machine with Python); held-out files give bits per byte.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from variants.registry import is_int_at_least

IGNORE = -100


@dataclass(frozen=True)
class MQAR:
    vocab: int = 512
    seq_len: int = 64
    pairs: int = 8
    min_pairs: int | None = None  # None: every training sequence holds `pairs` pairs

    name = "mqar"

    def __post_init__(self) -> None:
        if not is_int_at_least(self.pairs) or self.seq_len - 2 * self.pairs < self.pairs:
            raise ValueError(f"mqar: seq_len={self.seq_len} cannot hold {self.pairs} pairs and their queries")
        if self.vocab // 2 - 1 < self.pairs:
            raise ValueError(f"mqar: vocab={self.vocab} is too small for {self.pairs} pairs")
        if self.min_pairs is not None and not (is_int_at_least(self.min_pairs) and self.min_pairs <= self.pairs):
            raise ValueError(f"mqar: min_pairs={self.min_pairs} must lie in [1, pairs={self.pairs}]")

    @property
    def corpus(self) -> str:
        mixture = f"-train{self.min_pairs}to{self.pairs}" if self.min_pairs not in (None, self.pairs) else ""
        return f"mqar-v{self.vocab}-n{self.seq_len}-p{self.pairs}{mixture}"

    def batch(self, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (distinct) from the lower half of the vocabulary, values (distinct) from the upper half.

        As in Zoology, the value does not follow its query and the other tail tokens are random:
        a model cannot answer by elimination ("a value not yet seen in the tail"), a shortcut that
        otherwise holds attention on a ~1/3-accuracy plateau.
        """
        half = self.vocab // 2
        keys, values = _distinct(1, half, self.pairs, size, gen), _distinct(half, self.vocab, self.pairs, size, gen)
        tokens = torch.randint(0, self.vocab, (size, self.seq_len), generator=gen)
        labels = torch.full((size, self.seq_len), IGNORE, dtype=torch.long)
        counts = ([self.pairs] * size if self.min_pairs in (None, self.pairs) else
                  torch.randint(self.min_pairs, self.pairs + 1, (size,), generator=gen).tolist())
        for row, pairs in enumerate(counts):  # each key queried once, at distinct random tail positions
            kv, row_keys, row_values = 2 * pairs, keys[row, :pairs], values[row, :pairs]
            tokens[row, 0:kv:2], tokens[row, 1:kv:2] = row_keys, row_values
            where = kv + torch.randperm(self.seq_len - kv, generator=gen)[:pairs]
            tokens[row, where], labels[row, where] = row_keys, row_values
        return tokens, labels

    def eval_batches(self, size: int, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Held-out batches, every sequence with `pairs` pairs."""
        gen, fixed = held_out_generator(seed), replace(self, min_pairs=None)
        return [fixed.batch(size, gen) for _ in range(count)]


def held_out_generator(seed: int) -> torch.Generator:
    """The held-out batches' generator: a seed of its own, apart from the training batches' (seed)
    and the accumulation check's (seed + 1)."""
    return torch.Generator().manual_seed(10_000 + seed)


def _distinct(low: int, high: int, count: int, rows: int, gen: torch.Generator) -> torch.Tensor:
    """`count` distinct tokens from [low, high) for each of `rows` rows."""
    return torch.stack([torch.randperm(high - low, generator=gen)[:count] + low for _ in range(rows)])


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


@functools.lru_cache(maxsize=1)
def _stdlib_corpus(holdout_every: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    files = stdlib_files()
    if len(files) < 2 * holdout_every:
        raise RuntimeError(f"too few standard-library sources under {sysconfig.get_paths()['stdlib']}")
    digest = hashlib.sha256("\n".join(p.name for p in files).encode()).hexdigest()[:12]
    train = b"".join(p.read_bytes() for i, p in enumerate(files) if i % holdout_every)
    held = b"".join(p.read_bytes() for i, p in enumerate(files) if i % holdout_every == 0)
    as_tensor = lambda raw: torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(held), f"py{sys.version_info.major}.{sys.version_info.minor}-stdlib-{digest}"


@dataclass(frozen=True)
class Bytes:
    seq_len: int = 128
    holdout_every: int = 10  # every 10th file (sorted by name) is held out for validation

    name = "bytes"
    vocab = 256

    @property
    def corpus(self) -> str:
        """Python version and a hash of the file list: which text the bits per byte are measured on."""
        return _stdlib_corpus(self.holdout_every)[2]

    def _windows(self, data: torch.Tensor, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(data) - self.seq_len - 1, (size,), generator=gen)
        window = torch.stack([data[s: s + self.seq_len + 1] for s in starts.tolist()])
        return window[:, :-1], window[:, 1:]

    def batch(self, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(_stdlib_corpus(self.holdout_every)[0], size, gen)

    def eval_batches(self, size: int, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        gen = held_out_generator(seed)
        return [self._windows(_stdlib_corpus(self.holdout_every)[1], size, gen) for _ in range(count)]


TASKS = {"mqar": MQAR, "bytes": Bytes}
TaskData = MQAR | Bytes  # a task's batches, held-out batches, vocabulary and sequence length
