"""TfIdfVectorizer: n-gram counts of integer token ids (no gradient: its input is integers).

The pool lists n-grams by size (`ngram_counts[i]`: where the (i+1)-grams start in
`pool_int64s`); the i-th n-gram of the pool, counted across sizes, is output column
`ngram_indexes[i]`. Only sizes within [min_gram_length, max_gram_length] are looked for: in a
row, every run of n tokens `skip + 1` apart (skip from 0 to max_skip_count; unigrams once).

The reference walks a trie of the pool per start position. Here the trie is flattened into
one sorted table of prefix codes per level, built once: a length-k prefix is numbered by its
position in level k's table, and its code is (its length-(k-1) prefix's number) · V + (its
last token's position among the pool's V distinct tokens). At run time every start position
of every row takes a level at once: a code, a `searchsorted` in that level's table, a hit or
-1 (no pool n-gram begins so). The Python loops run over skip distances and levels, which the
attributes bound, never over tokens.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import require
from service.engine.onnx.registry import OpContext, register

MODES = ("TF", "IDF", "TFIDF")
MISSING = -1  # a prefix no pool n-gram starts with; a position the row does not reach


@dataclass(frozen=True)
class _PrefixTables:
    """The pool's n-grams of the looked-for sizes as per-level sorted prefix codes.

    `tokens`: the distinct tokens of those n-grams, sorted. `levels[k-1]`: the sorted codes
    of every length-k prefix. `columns[k-1]`: per length-k prefix, the output column of the
    k-gram it completes, or the row's spill column (`output_size`) if it completes none."""

    tokens: torch.Tensor
    levels: list[torch.Tensor]
    columns: list[torch.Tensor]

    def to(self, device: torch.device) -> _PrefixTables:
        if self.tokens.device == device:
            return self
        return _PrefixTables(
            self.tokens.to(device),
            [level.to(device) for level in self.levels],
            [column.to(device) for column in self.columns],
        )


def _pool_grams(
    pool: list[int], ngram_counts: list[int], ngram_indexes: list[int], sizes: range
) -> dict[int, tuple[torch.Tensor, list[int]]]:
    """Per looked-for size n: the pool's n-grams [P, n] and their ids (positions among all
    the pool's n-grams, sizes outside `sizes` counted too, as the reference numbers them). An
    end that does not fill a whole n-gram is left out, as there."""
    grams: dict[int, tuple[torch.Tensor, list[int]]] = {}
    first_id = 0
    for i, start in enumerate(ngram_counts):
        size = i + 1
        end = ngram_counts[i + 1] if i + 1 < len(ngram_counts) else len(pool)
        count = (end - start) // size
        if count > 0 and size in sizes:
            require(
                first_id + count <= len(ngram_indexes),
                f"TfIdfVectorizer ngram_indexes has {len(ngram_indexes)} entries; the pool's "
                f"{size}-grams need {first_id + count}",
            )
            values = torch.tensor(pool[start : start + count * size], dtype=torch.int64)
            grams[size] = (values.reshape(count, size), list(range(first_id, first_id + count)))
        first_id += count
    return grams


def _prefix_tables(
    grams: dict[int, tuple[torch.Tensor, list[int]]], ngram_indexes: list[int]
) -> _PrefixTables | None:
    """The trie of `grams`, level by level (None without any n-gram)."""
    if not grams:
        return None
    output_size = max(ngram_indexes) + 1
    tokens = torch.unique(torch.cat([g.reshape(-1) for g, _ in grams.values()]))
    # Each n-gram's tokens as positions in `tokens`, and its prefix number so far
    positions = {n: torch.searchsorted(tokens, g) for n, (g, _) in grams.items()}
    prefixes = {n: torch.zeros(len(g), dtype=torch.int64) for n, (g, _) in grams.items()}
    levels, columns = [], []
    for k in range(1, max(grams) + 1):
        codes = {n: prefixes[n] * len(tokens) + positions[n][:, k - 1] for n in grams if n >= k}
        level = torch.unique(torch.cat(list(codes.values())))
        prefixes = {n: torch.searchsorted(level, code) for n, code in codes.items()}
        column = [output_size] * len(level)
        if k in grams:
            # a duplicate n-gram counts in its last column (the reference's trie overwrites)
            for prefix, gram_id in zip(prefixes[k].tolist(), grams[k][1], strict=True):
                column[prefix] = ngram_indexes[gram_id]
        levels.append(level)
        columns.append(torch.tensor(column, dtype=torch.int64))
    return _PrefixTables(tokens, levels, columns)


def _lookup(table: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Each key's position in the sorted `table`, MISSING where absent (or key MISSING)."""
    at = torch.searchsorted(table, keys).clamp(max=len(table) - 1)
    return torch.where((keys != MISSING) & (table[at] == keys), at, MISSING)


def _extend(
    prefix: torch.Tensor, token: torch.Tensor, level: torch.Tensor, distinct: int
) -> torch.Tensor:
    """The prefixes one token longer: their numbers in `level`, MISSING where none."""
    valid = (prefix != MISSING) & (token != MISSING)
    return _lookup(level, torch.where(valid, prefix * distinct + token, MISSING))


def _counts(
    rows: torch.Tensor,
    tables: _PrefixTables,
    sizes: range,
    max_skip: int,
    output_size: int,
) -> torch.Tensor:
    """How often each output column's n-grams occur per row: [B, output_size], int64."""
    batch, length = rows.shape
    token = _lookup(tables.tokens, rows)
    # one spill column past the output's end takes every prefix that completes no n-gram
    counts = torch.zeros(batch, output_size + 1, dtype=torch.int64, device=rows.device)
    for skip in range(max_skip + 1):
        smallest = sizes.start if skip == 0 else max(sizes.start, 2)  # unigrams only once
        if smallest >= sizes.stop:
            break
        prefix = torch.zeros_like(token)  # the empty prefix, numbered 0
        for k, (level, column) in enumerate(zip(tables.levels, tables.columns, strict=True)):
            span = length - k * (skip + 1)  # start positions whose k-th token is in the row
            if span <= 0:
                break
            last = token[:, k * (skip + 1) : k * (skip + 1) + span]
            prefix = _extend(prefix[:, :span], last, level, len(tables.tokens))
            if k + 1 >= smallest:
                hit = column[prefix.clamp(min=0)].masked_fill(prefix == MISSING, output_size)
                counts.scatter_add_(1, hit, torch.ones_like(hit))
    return counts[:, :output_size]


def _weighted(counts: torch.Tensor, mode: str, weights: torch.Tensor | None) -> torch.Tensor:
    """TF: the counts; IDF: 1 (or the column's weight) where a count is positive; TFIDF: the
    counts times the columns' weights."""
    values = (counts > 0) if mode == "IDF" else counts
    values = values.to(torch.float32)
    if mode != "TF" and weights is not None:
        values = values * weights.to(values.device)
    return values


def _ints_attr(ctx: OpContext, name: str) -> list[int]:
    value = ctx.attr(name)
    require(value is not None, f"TfIdfVectorizer needs its '{name}' attribute")
    return [int(v) for v in value]


def _int_attr(ctx: OpContext, name: str) -> int:
    value = ctx.attr(name)
    require(value is not None, f"TfIdfVectorizer needs its '{name}' attribute")
    return int(value)


@register("TfIdfVectorizer", since=9)
def tfidf_vectorizer(ctx: OpContext) -> NodeFn:
    require(
        ctx.attr("pool_strings") is None,
        "TfIdfVectorizer pool_strings: string tensors are not supported; map the tokens to "
        "integer ids and use pool_int64s",
    )
    mode = str(ctx.attr("mode"))
    require(mode in MODES, f"TfIdfVectorizer mode {mode!r} is not one of {', '.join(MODES)}")
    min_gram, max_gram = _int_attr(ctx, "min_gram_length"), _int_attr(ctx, "max_gram_length")
    max_skip = _int_attr(ctx, "max_skip_count")
    require(
        1 <= min_gram <= max_gram,
        f"TfIdfVectorizer gram lengths [{min_gram}, {max_gram}] are not 1 <= min <= max",
    )
    require(max_skip >= 0, f"TfIdfVectorizer max_skip_count {max_skip} is negative")
    pool = _ints_attr(ctx, "pool_int64s")
    ngram_counts = _ints_attr(ctx, "ngram_counts")
    ngram_indexes = _ints_attr(ctx, "ngram_indexes")
    require(
        all(a <= b for a, b in itertools.pairwise([0, *ngram_counts, len(pool)])),
        f"TfIdfVectorizer ngram_counts {ngram_counts} are not ascending offsets into "
        f"pool_int64s ({len(pool)} values)",
    )
    require(
        bool(ngram_indexes) and min(ngram_indexes) >= 0,
        f"TfIdfVectorizer ngram_indexes {ngram_indexes} must be non-empty and non-negative",
    )
    output_size = max(ngram_indexes) + 1
    sizes = range(min_gram, max_gram + 1)
    grams = _pool_grams(pool, ngram_counts, ngram_indexes, sizes)
    gram_ids = [gram_id for _, ids in grams.values() for gram_id in ids]
    weights = _column_weights(ctx.attr("weights"), ngram_indexes, gram_ids)
    tables = _prefix_tables(grams, ngram_indexes)
    tables_on: dict[torch.device, _PrefixTables] = {}  # copied once per device, not per call

    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2:
            raise ValueError(f"TfIdfVectorizer takes a [C] or [N, C] input, got {list(x.shape)}")
        rows = x.reshape(1, -1) if x.dim() < 2 else x
        if tables is None or rows.numel() == 0:
            counts = torch.zeros(rows.shape[0], output_size, dtype=torch.int64, device=x.device)
        else:
            if x.device not in tables_on:
                tables_on[x.device] = tables.to(x.device)
            on_device = tables_on[x.device]
            counts = _counts(rows.long(), on_device, sizes, max_skip, output_size)
        y = _weighted(counts, mode, weights)
        return y if x.dim() == 2 else y.reshape(output_size)

    return fn


def _column_weights(
    weights: list[float] | None, ngram_indexes: list[int], gram_ids: list[int]
) -> torch.Tensor | None:
    """The weight of each output column, as onnx's reference applies them (column j times
    weights[j]). onnxruntime instead weighs the i-th pool n-gram by weights[i] (the spec's
    wording); the two agree where every looked-for n-gram's weight is its column's, which
    holds whenever ngram_indexes is the identity. Where they disagree the node is refused
    rather than matching one runtime and not the other."""
    if weights is None:
        return None
    output_size = max(ngram_indexes) + 1
    require(
        len(weights) >= output_size,
        f"TfIdfVectorizer has {len(weights)} weights for {output_size} output columns",
    )
    for gram_id in gram_ids:
        column = ngram_indexes[gram_id]
        require(
            gram_id < len(weights) and weights[gram_id] == weights[column],
            f"TfIdfVectorizer weights are ambiguous: n-gram {gram_id} counts in column {column}, "
            "and onnxruntime weighs it by weights[n-gram] where onnx's reference weighs the "
            "column by weights[column], which differ here; list the pool in column order "
            "(ngram_indexes[i] = i) or apply the weights with a Mul after the node",
        )
    return torch.tensor(weights[:output_size], dtype=torch.float32)
