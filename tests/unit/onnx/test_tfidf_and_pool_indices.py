"""TfIdfVectorizer (ops/tfidf.py) and MaxPool's column-major indices (storage_order=1,
ops/conv.py): the backend cases, then onnx's ReferenceEvaluator (and onnxruntime for the
pool) on what the backend data does not cover: IDF/TFIDF with weights, trigrams, skips over
batched rows, permuted and duplicate n-grams; 3-D and padded pools."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from service.engine.onnx.convert import convert
from service.errors import UnsupportedModelError
from tests.support.recurrent_zoo import run_onnxruntime
from tests.unit.onnx.backend_cases import node_cases_named, run_case

BACKEND_CASES = (
    "test_tfidfvectorizer_tf_only_bigrams_skip0",
    "test_tfidfvectorizer_tf_batch_onlybigrams_skip0",
    "test_tfidfvectorizer_tf_onlybigrams_levelempty",
    "test_tfidfvectorizer_tf_onlybigrams_skip5",
    "test_tfidfvectorizer_tf_batch_onlybigrams_skip5",
    "test_tfidfvectorizer_tf_uniandbigrams_skip5",
    "test_tfidfvectorizer_tf_batch_uniandbigrams_skip5",
    "test_maxpool_with_argmax_2d_precomputed_strides",
)


@pytest.mark.parametrize("name", BACKEND_CASES)
def test_backend_case_passes(name: str) -> None:
    assert run_case(node_cases_named(BACKEND_CASES)[name]) == ("pass", "")


def _one_node_model(
    node: onnx.NodeProto, x: np.ndarray, outputs: Sequence[tuple[str, int]], opset: int
) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(x.dtype), x.shape)],
        [helper.make_tensor_value_info(name, elem, None) for name, elem in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _reference(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return list(ReferenceEvaluator(model).run(None, {"x": x}))


def _converted(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [y.numpy() for y in convert(model, mode="eval").run([torch.from_numpy(x)])]


# A pool of 3 unigrams, 4 bigrams and 2 trigrams (ids 0-8). ngram_indexes swaps columns 0/1
# and 3/4 and sends the last trigram to the column of the last bigram; every n-gram's weight is
# its column's, where onnx's reference (weights by column) and onnxruntime (by n-gram) agree.
UNIGRAMS = [2, 3, 5]
BIGRAMS = [2, 3, 3, 5, 5, 2, 3, 3]
TRIGRAMS = [2, 3, 5, 5, 5, 2]
POOL = [*UNIGRAMS, *BIGRAMS, *TRIGRAMS]
NGRAM_COUNTS = [0, len(UNIGRAMS), len(UNIGRAMS) + len(BIGRAMS)]
NGRAM_INDEXES = [1, 0, 2, 4, 3, 5, 6, 7, 6]
WEIGHTS = [1.5, 1.5, 2.0, 0.25, 0.25, 3.0, 1.25, 4.0, 1.25]
BATCH = np.array(
    [
        [2, 3, 5, 5, 2, 3, 3, 5, 9, 2],
        [5, 2, 3, 5, 2, 3, 5, 5, 5, 2],
        [9, 9, 2, 9, 3, 9, 5, 3, 2, 3],
    ],
    dtype=np.int64,
)


def _tfidf_model(x: np.ndarray, **attrs: Any) -> onnx.ModelProto:
    attrs = {
        "ngram_counts": NGRAM_COUNTS,
        "ngram_indexes": NGRAM_INDEXES,
        "pool_int64s": POOL,
        **attrs,
    }
    node = helper.make_node("TfIdfVectorizer", ["x"], ["y"], **attrs)
    return _one_node_model(node, x, [("y", TensorProto.FLOAT)], opset=9)


def _assert_counts(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("mode", ["TF", "IDF", "TFIDF"])
@pytest.mark.parametrize("weights", [None, WEIGHTS])
@pytest.mark.parametrize(("min_gram", "max_gram"), [(1, 3), (2, 3), (1, 1), (3, 3)])
@pytest.mark.parametrize("max_skip", [0, 2])
@pytest.mark.parametrize("x", [BATCH, BATCH[1].astype(np.int32)], ids=["2-D", "1-D-int32"])
def test_tfidf_matches_reference_and_onnxruntime(
    mode: str,
    weights: list[float] | None,
    min_gram: int,
    max_gram: int,
    max_skip: int,
    x: np.ndarray,
) -> None:
    attrs = {"weights": weights} if weights is not None else {}
    model = _tfidf_model(
        x,
        mode=mode,
        min_gram_length=min_gram,
        max_gram_length=max_gram,
        max_skip_count=max_skip,
        **attrs,
    )
    (got,) = _converted(model, x)
    _assert_counts(got, run_onnxruntime(model, {"x": x})[0])
    if mode == "TF" or weights is not None:  # the reference fails on IDF/TFIDF without weights
        _assert_counts(got, _reference(model, x)[0])


def test_tfidf_duplicate_ngram_counts_in_its_last_column() -> None:
    """As the reference's trie (onnxruntime refuses such a pool): bigram 3 3 is listed
    twice, for columns 1 and 2."""
    x = BATCH[:2]
    model = _tfidf_model(
        x,
        mode="TF",
        min_gram_length=2,
        max_gram_length=2,
        max_skip_count=1,
        ngram_counts=[0, 0],
        ngram_indexes=[0, 1, 2],
        pool_int64s=[2, 3, 3, 3, 3, 3],
    )
    (got,) = _converted(model, x)
    _assert_counts(got, _reference(model, x)[0])
    assert got[:, 1].sum() == 0 and got[0, 2] == 1


def test_tfidf_weights_the_runtimes_read_differently_are_refused() -> None:
    """Column 0 holds n-gram 1: onnxruntime would weigh it 1.5, the reference 0.5."""
    x = BATCH
    model = _tfidf_model(
        x,
        mode="TFIDF",
        min_gram_length=1,
        max_gram_length=1,
        max_skip_count=0,
        ngram_counts=[0],
        ngram_indexes=[1, 0],
        pool_int64s=[2, 3],
        weights=[0.5, 1.5],
    )
    with pytest.raises(UnsupportedModelError) as info:
        convert(model, mode="eval")
    assert (
        "TfIdfVectorizer weights are ambiguous: n-gram 0 counts in column 1" in info.value.message
    )


def test_tfidf_counts_skipped_trigrams_across_rows() -> None:
    """Written-out counts: the reference agreeing with a wrong implementation would not do."""
    x = np.array([[2, 3, 5, 7, 7], [2, 7, 3, 7, 5]], dtype=np.int64)
    node = helper.make_node(
        "TfIdfVectorizer",
        ["x"],
        ["y"],
        mode="TF",
        min_gram_length=3,
        max_gram_length=3,
        max_skip_count=1,
        ngram_counts=[0, 0, 0],
        ngram_indexes=[0],
        pool_int64s=[2, 3, 5],
    )
    (got,) = _converted(_one_node_model(node, x, [("y", TensorProto.FLOAT)], opset=9), x)
    # row 0: 2 3 5 at positions 0,1,2 (skip 0); row 1: at positions 0,2,4 (skip 1)
    np.testing.assert_array_equal(got, [[1.0], [1.0]])


def test_tfidf_pool_strings_refused() -> None:
    node = helper.make_node(
        "TfIdfVectorizer",
        ["x"],
        ["y"],
        mode="TF",
        min_gram_length=1,
        max_gram_length=1,
        max_skip_count=0,
        ngram_counts=[0],
        ngram_indexes=[0, 1],
        pool_strings=["a", "b"],
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.STRING, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 8
    with pytest.raises(UnsupportedModelError) as info:
        convert(model, mode="eval")
    assert "pool_strings: string tensors are not supported" in info.value.message


def _max_pool_model(x: np.ndarray, **attrs: Any) -> onnx.ModelProto:
    node = helper.make_node("MaxPool", ["x"], ["y", "indices"], storage_order=1, **attrs)
    outputs = [("y", TensorProto.FLOAT), ("indices", TensorProto.INT64)]
    return _one_node_model(node, x, outputs, opset=12)


@pytest.mark.parametrize(
    ("shape", "attrs"),
    [
        ([2, 3, 5, 6, 7], {"kernel_shape": [2, 3, 2], "strides": [2, 2, 2]}),
        (
            [1, 2, 6, 5, 7],
            {"kernel_shape": [3, 2, 2], "strides": [2, 1, 3], "pads": [1, 0, 1, 1, 1, 0]},
        ),
        ([2, 2, 7, 5], {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 1, 1, 0]}),
        ([2, 2, 7, 5], {"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1}),
        ([2, 2, 9], {"kernel_shape": [3], "strides": [2]}),
    ],
    ids=["3-D", "3-D-padded", "2-D-padded", "2-D-ceil", "1-D"],
)
def test_column_major_indices_match_reference_and_onnxruntime(
    shape: list[int], attrs: dict[str, Any]
) -> None:
    # strides other than 1: the reference ignores storage_order on its all-ones fast path
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    model = _max_pool_model(x, **attrs)
    got = _converted(model, x)
    for want in (_reference(model, x), run_onnxruntime(model, {"x": x})):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
