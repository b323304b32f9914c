"""Does the converted graph compute what onnxruntime computes on the same batch?

`check_conversion` runs onnxruntime (CPUExecutionProvider) on the model and compares its outputs
with the converted graph's forward outputs: the report's `model.conversion` (CONTRACT.md §3).

Which forward is compared: onnxruntime runs the graph as exported. A graph converted in
`eval` mode computes exactly that. A graph converted in `train` mode differs where the mode
changes semantics on purpose (BatchNormalization exported for inference normalised with batch
statistics, dropout kept active on request); then a second conversion of the same weights in
`eval` mode is compared and `reason` says so. Training-mode exports (BatchNormalization with
`training_mode=1`) run with batch statistics in onnxruntime too, so they compare directly.
Dropout whose `training_mode` input is set is random: it is switched off on both sides (a
constant False fed to onnxruntime, the same for the compared graph) and `reason` says so.
Other random draws (RandomUniformLike and kin: ViT-MAE's random masking draws its patch order)
cannot be switched off: onnxruntime's copy reads the converter's draws from this very forward
as inputs instead (`_feed_draws`), so both compute on the same numbers.

Errors: `max_abs_error` = max |ours − ort| over all float outputs; `max_rel_error` = max of
|ours − ort| / max(|ort|, 1e-3 · max|ort|) per output, so entries near zero do not explode it
(for fp16 outputs 16 fp16 steps of max|ort| instead of 1e-3, and `reason` says so: rounding
alone moves a small fp16 entry by a large fraction of itself).

Cost: building the onnxruntime session (and the eval-mode twin) is the check's fixed part, the
comparison the per-batch part. A caller that checks many batches of one unchanged model (a
worker's cache of loaded models) keeps both in a `ConformanceReference`; one-shot callers (the
CLI) pass none and nothing outlives the call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import ModelProto, TensorProto

from service.engine.graph import ObservableGraph
from service.engine.onnx.convert import convert
from service.engine.onnx.ops._util import SUB_BYTE_TO_TORCH, TORCH_TO_ONNX, sub_byte_proto
from service.engine.onnx.ort_session import SessionCrashed, SessionSettings, create_session
from service.engine.onnx.recurrent_weights import GateReorder
from service.engine.report import ConversionCheck
from service.errors import first_line

PROVIDER = "CPUExecutionProvider"


def _reference() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__} ({PROVIDER})"


def _refill(model: ModelProto, graph: ObservableGraph) -> ModelProto:
    """A copy of `model` whose initializers hold the graph's current values."""
    values = graph.initial_values()
    # initializers the converter turned back into the weights they were computed from
    transposed = graph.metadata.get("transposed_initializers", {})
    for folded, weight in transposed.items():
        if isinstance(values.get(weight), torch.Tensor):
            values[folded] = values[weight].t()
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    for folded, vector in graph.metadata.get("reshaped_initializers", {}).items():
        if isinstance(values.get(vector), torch.Tensor) and folded in shapes:
            values[folded] = values[vector].reshape(shapes[folded])
    for folded, recipe in graph.metadata.get("gate_reordered_initializers", {}).items():
        with torch.no_grad():
            values[folded] = GateReorder(recipe.blocks, recipe.halves)(
                *(values[name] for name in recipe.parameters)
            )
    copy = ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        value = values.get(init.name)
        if not isinstance(value, torch.Tensor):
            continue
        tensor = value.detach().cpu().contiguous()
        if init.data_type in SUB_BYTE_TO_TORCH:  # held one per byte, stored 2 or 4 per byte
            init.CopyFrom(sub_byte_proto(init.name, tensor, init.data_type))
            continue
        fresh = TensorProto(name=init.name, dims=list(tensor.shape))
        fresh.data_type = TORCH_TO_ONNX[tensor.dtype]
        fresh.raw_data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        init.CopyFrom(fresh)
    return copy


def _expected_masks(model: ModelProto, masks: dict[str, tuple[str, str]]) -> None:
    """onnxruntime's copy computes each random mask the converter took at its expected value
    (ops/random.py) the same way: `Less(u, p)` becomes `Expand(p, Shape(u))` (in place)."""
    if not masks:
        return
    nodes = []
    for node in model.graph.node:
        mask = masks.get(node.output[0]) if node.output else None
        if mask is None:
            nodes.append(node)
            continue
        draw, threshold = mask
        shape = f"{node.output[0]}/gradhealth_shape"
        nodes.append(onnx.helper.make_node("Shape", [draw], [shape]))
        nodes.append(onnx.helper.make_node("Expand", [threshold, shape], [node.output[0]]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [v for v in model.graph.value_info if v.name not in masks]  # declared bool
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


# ops that draw random numbers; a top-level one's output is fed to onnxruntime's copy
RANDOM_OPS = frozenset(
    {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli"}
)
RANDOM_OPS |= {"Multinomial"}


def _draw_outputs(model: ModelProto) -> list[str]:
    """The outputs of the graph's top-level random ops (in a subgraph they stay random)."""
    return [
        node.output[0]
        for node in model.graph.node
        if node.op_type in RANDOM_OPS and node.domain in ("", "ai.onnx") and node.output
    ]


def _feed_draws(model: ModelProto, dtypes: dict[str, int]) -> None:
    """Each top-level random op of `model` becomes a graph input of its output's name and
    dtype (in place): onnxruntime then computes on the draws it is given."""
    if not dtypes:
        return
    kept = [node for node in model.graph.node if not (node.output and node.output[0] in dtypes)]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.graph.input.extend(
        onnx.helper.make_tensor_value_info(name, dtype, None) for name, dtype in dtypes.items()
    )
    others = [v for v in model.graph.value_info if v.name not in dtypes]
    del model.graph.value_info[:]
    model.graph.value_info.extend(others)


def _run_capturing(
    graph: ObservableGraph, inputs: list[torch.Tensor], names: set[str]
) -> tuple[list[Any], dict[str, torch.Tensor]]:
    """The graph's outputs and the values of `names` from the same run; torch's generator
    state is left as it was (a diagnosis draws from its own seed afterwards)."""
    captured: dict[str, torch.Tensor] = {}

    def observe(node: Any, outputs: Sequence[Any]) -> None:
        for name, value in zip(node.outputs, outputs, strict=False):
            if name in names and isinstance(value, torch.Tensor):
                captured[name] = value.detach().cpu()

    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        return graph.run(inputs, observe), captured


DROPOUT_OFF = "gradhealth::dropout_off"


def _switch_dropout_off(model: ModelProto) -> bool:
    """Point every Dropout's training_mode input at a constant False (in place); True if any.

    Active dropout is random, so neither side can reproduce the other; both compare with it
    off (the diagnosis' train mode has it off anyway unless asked for).
    """
    changed = False
    for node in _active_dropouts(model):
        node.input[2] = DROPOUT_OFF
        changed = True
    if changed:
        model.graph.initializer.append(
            onnx.helper.make_tensor(DROPOUT_OFF, TensorProto.BOOL, [], [False])
        )
        if model.ir_version < 4:
            model.graph.input.append(
                onnx.helper.make_tensor_value_info(DROPOUT_OFF, TensorProto.BOOL, [])
            )
    return changed


def _full_precision_nbits(model: ModelProto) -> int:
    """Set every MatMulNBits' accuracy_level to 0 (in place); how many asked for more.

    accuracy_level tells onnxruntime it may quantise A to compute faster (onnxruntime-genai
    writes 4 for the CPU: A in int8 blocks); it is not what the product is. The converter
    computes A times the dequantized weight in float, so onnxruntime is asked for that too:
    on a genai Llama export, logits 4e-3 apart (400 % of the smallest) at level 4, 1.2e-7 at 0.
    """
    changed = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        for attr in node.attribute:
            if attr.name == "accuracy_level" and attr.i != 0:
                attr.i, changed = 0, changed + 1
    return changed


def _active_dropouts(model: ModelProto) -> list[Any]:
    """The Dropout nodes whose training_mode input is set."""
    return [
        node
        for node in model.graph.node
        if node.op_type == "Dropout" and len(node.input) >= 3 and node.input[2]
    ]


def _dropout_random(graph: ObservableGraph) -> bool:
    """Whether the converted graph keeps dropout active (eval mode, or --dropout)."""
    return graph.metadata.get("mode") == "eval" or bool(
        graph.metadata.get("extra", {}).get("dropout")
    )


def _twin_needed(model: ModelProto, graph: ObservableGraph) -> bool:
    """Whether the comparison is against the eval-mode twin (the module doc says when)."""
    dropout = bool(_active_dropouts(model)) and _dropout_random(graph)
    return _batch_norm_differs(model, graph) or dropout


def _batch_norm_differs(model: ModelProto, graph: ObservableGraph) -> bool:
    """Train mode normalises with batch statistics where the export used running ones."""
    if graph.metadata.get("mode", "eval") != "train":
        return False
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            training = (
                bool(attrs.get("training_mode", 0)) if opset >= 14 else any(list(node.output)[1:])
            )
            if not training:
                return True
    return False


# the relative error's floor for fp16 outputs, in steps (eps) of the largest output's scale
HALF_FLOOR_STEPS = 16


def _metrics(ours: Sequence[Any], theirs: Sequence[np.ndarray]) -> tuple[float, float]:
    max_abs, max_rel = 0.0, 0.0
    for a, b in zip(ours, theirs, strict=True):
        if not isinstance(a, torch.Tensor) or b.dtype.kind not in "fc":
            continue
        ref = torch.from_numpy(np.asarray(b, dtype=np.float64))
        got = a.detach().cpu().to(torch.float64)
        if got.shape != ref.shape:
            raise ValueError(f"shape {list(got.shape)} vs onnxruntime's {list(ref.shape)}")
        if ref.numel() == 0:
            continue
        # the same non-finite value on both sides agrees; a NaN or inf on one side only is an
        # infinite error (Python's max() would drop a NaN difference: max(0.0, nan) is 0.0)
        agree = (got.isnan() & ref.isnan()) | (~torch.isfinite(ref) & (got == ref))
        diff = torch.where(agree, 0.0, (got - ref).abs().nan_to_num(nan=float("inf")))
        scale = ref.abs().nan_to_num(0.0, 0.0, 0.0).max().clamp(min=1e-30)
        fraction = 1e-3 if b.itemsize >= 4 else HALF_FLOOR_STEPS * float(np.finfo(b.dtype).eps)
        floor = torch.clamp(ref.abs(), min=float(scale) * fraction)
        relative = torch.where(diff.isinf(), float("inf"), diff / floor)
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float(relative.max()))
    return max_abs, max_rel


class ConformanceReference:
    """What the check builds from the model's weights, kept for the next batch's check.

    The onnxruntime session (parsing, optimising and copying the initializers: the check's
    fixed cost, paid again for every batch without this) and, where the check compares an
    eval-mode twin (see the module doc), that twin. Built on first use from the graph's weights
    at that time, so a holder is only for a caller that checks many batches against a model
    whose weights do not change between checks: a worker's cache of loaded models (it puts
    written buffers back after each job and drops a model whose parameters a job wrote, and
    with the model, its holder). The comparison itself runs on every batch.

    One-shot callers (the CLI) pass no holder: `check_conversion` builds one for the call and
    drops it on return, as before. `close()` frees the session and the twin at once.
    """

    def __init__(self) -> None:
        self._providers: tuple[str, ...] | None = None
        self._session: Any = None
        self._failure: str | None = None  # onnxruntime cannot load the model: the same next time
        self._dropout_switched = False
        self.full_precision_nbits = 0  # MatMulNBits nodes asked to compute in full precision
        self.quantized_lstms = 0  # DynamicQuantizeLSTM nodes: the session runs on one thread
        self._twin: ObservableGraph | None = None
        self._twin_built = False
        self._session_bytes = 0
        self.sessions_built = 0

    @property
    def size_bytes(self) -> int:
        """Host memory held: the session's copy of the weights (estimated as the size of the
        model it was built from; onnxruntime may pre-pack some weights on top) and the twin's
        parameters and buffers."""
        twin = 0
        if self._twin is not None:
            tensors = list(self._twin.parameters()) + list(self._twin.buffers())
            twin = sum(t.numel() * t.element_size() for t in tensors)
        return self._session_bytes + twin

    def close(self) -> None:
        self._providers = self._session = self._failure = self._twin = None
        self._twin_built = False
        self._session_bytes = 0

    def session(
        self,
        model: ModelProto,
        graph: ObservableGraph,
        providers: Sequence[str],
        draws: dict[str, int] | None = None,
    ) -> Any:
        """The session for `providers` (a session is never reused for other providers);
        raises `ReferenceUnavailable` with the reason when onnxruntime cannot load the model.
        `draws`: the random ops' outputs it reads as inputs, with their ONNX dtypes."""
        if self._providers != tuple(providers):
            self.close()
            self._providers = tuple(providers)
            refilled = _refill(model, graph)
            _expected_masks(refilled, graph.metadata.get("expected_masks", {}))
            _feed_draws(refilled, draws or {})
            self._dropout_switched = _switch_dropout_off(refilled)
            self.full_precision_nbits = _full_precision_nbits(refilled)
            self.quantized_lstms = sum(
                n.op_type == "DynamicQuantizeLSTM" for n in refilled.graph.node
            )
            serialized = refilled.SerializeToString()
            del refilled
            # a kept session's idle threads must sleep, not spin after each check: they
            # would take the cores from the job's own forward and backward that follow
            config = {
                "session.intra_op.allow_spinning": "0",
                "session.inter_op.allow_spinning": "0",
                # a QuantizeLinear → DequantizeLinear pair is fake quantisation in float
                # here; onnxruntime's optimiser would fuse it with the op between into
                # integer kernels (QGemm, QLinearConv) whose requantisation rounds differently
                "session.disable_quant_qdq": "1",
            }
            settings = SessionSettings(
                tuple(providers),
                # its quantised LSTM kernel quantises h_{t-1} per block of batch rows, one
                # block a thread: on one thread the whole batch at once (quantized_lstm.py)
                intra_op_num_threads=1 if self.quantized_lstms else 0,
                config=config,
            )
            try:
                self._session = create_session(serialized, settings)
                self._session_bytes = len(serialized)
                self.sessions_built += 1
            except SessionCrashed as exc:
                self._failure = str(exc)
            except Exception as exc:
                self._failure = f"onnxruntime cannot load the model: {first_line(exc)}"
        if self._failure is not None:
            raise ReferenceUnavailable(self._failure)
        return self._session

    @property
    def dropout_switched(self) -> bool:
        """Whether the session's model has its Dropout switched off (`_switch_dropout_off`)."""
        return self._dropout_switched

    def twin(self, model: ModelProto, graph: ObservableGraph) -> ObservableGraph:
        """The same weights converted in `eval` mode, as onnxruntime runs them (CPU)."""
        if not self._twin_built:
            refilled = _refill(model, graph)
            _expected_masks(refilled, graph.metadata.get("expected_masks", {}))
            _switch_dropout_off(refilled)
            self._twin = convert(refilled, mode="eval", release_weights=False)
            self._twin_built = True
        assert self._twin is not None
        return self._twin


class ReferenceUnavailable(Exception):
    """onnxruntime cannot load the model; the message says why (goes into the check)."""


def check_conversion(
    model: ModelProto,
    graph: ObservableGraph,
    inputs: list[torch.Tensor],
    outputs: list[torch.Tensor] | None = None,
    *,
    reference: ConformanceReference | None = None,
) -> ConversionCheck:
    """Compare the converted forward with onnxruntime on `inputs`; never raises for a model
    onnxruntime cannot run (the check says why instead). `reference`: the session (and twin)
    kept from an earlier check of the same unchanged model (see `ConformanceReference`)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
        return ConversionCheck(checked=False, reason=f"onnxruntime is not installed: {exc}")
    reference_name = _reference()
    try:
        feeds = {
            name: value.detach().cpu().numpy()
            for name, value in zip(graph.input_names, inputs, strict=True)
        }
    except (TypeError, ValueError) as exc:
        return ConversionCheck(
            checked=False,
            reference=reference_name,
            reason=f"inputs cannot be given to onnxruntime: {exc}",
        )
    kept = reference if reference is not None else ConformanceReference()
    draw_names = set(_draw_outputs(model))
    draws: dict[str, torch.Tensor] = {}
    if draw_names:
        # our forward first: onnxruntime's copy computes on its random draws
        compared = kept.twin(model, graph) if _twin_needed(model, graph) else graph
        ours, draws = _run_capturing(compared, [t.detach().cpu() for t in inputs], draw_names)
        outputs = ours
        feeds.update({name: value.numpy() for name, value in draws.items()})
    try:
        session = kept.session(
            model, graph, [PROVIDER], {n: TORCH_TO_ONNX[v.dtype] for n, v in draws.items()}
        )
    except ReferenceUnavailable as exc:
        return ConversionCheck(checked=False, reference=reference_name, reason=str(exc))
    try:
        expected = session.run(None, feeds)
    except Exception as exc:
        return ConversionCheck(
            checked=False,
            reference=reference_name,
            reason=f"onnxruntime failed to run the model: {first_line(exc)}",
        )

    reasons: list[str] = []
    twin_needed = _twin_needed(model, graph)
    if _batch_norm_differs(model, graph):
        reasons.append(
            "compared in eval mode: the model's BatchNormalization was exported for inference, "
            "which onnxruntime runs with running statistics, while train mode normalises with "
            "batch statistics"
        )
    if kept.dropout_switched:
        reasons.append("dropout switched off on both sides for the comparison (it is random)")
    if kept.full_precision_nbits:
        reasons.append(
            f"{kept.full_precision_nbits} MatMulNBits node(s) let onnxruntime quantise their "
            "input for speed (accuracy_level): compared at accuracy_level 0, the product their "
            "weights define, which the converter computes"
        )
    if kept.quantized_lstms:
        reasons.append(
            f"{kept.quantized_lstms} DynamicQuantizeLSTM node(s): onnxruntime ran on one thread, "
            "where its kernel quantises each step's hidden state over the whole batch as the "
            "converter does (on more threads it quantises a block of rows per thread)"
        )
    if draws:
        reasons.append(
            f"the model draws random numbers ({len(draws)} random op(s)): onnxruntime was "
            "given the converter's draws from the compared forward"
        )
    with torch.no_grad():
        if draws:
            ours = list(outputs or [])  # the forward whose draws onnxruntime was given
        elif twin_needed:  # same weights, converted as onnxruntime runs them
            ours = kept.twin(model, graph).run([t.detach().cpu() for t in inputs])
        elif outputs is not None:
            ours = list(outputs)
        else:
            ours = graph.run(list(inputs))
    if reference is None:
        kept.close()  # one-shot: nothing outlives the check
    if graph.metadata.get("dynamic_quantizers"):
        reasons.append(
            f"the model quantises {len(graph.metadata['dynamic_quantizers'])} activation(s) at "
            "run time (DynamicQuantizeLinear), computed here as fake quantisation: where a float "
            "product's last bits differ from onnxruntime's integer one, a value can cross a "
            "rounding boundary of the next quantiser (one step of it) and the difference "
            "travels on, so errors of a few such steps are agreement"
        )
    if graph.metadata.get("fake_quantizers"):
        reasons.append(
            f"the model has {len(graph.metadata['fake_quantizers'])} fake quantiser(s): a "
            "last-bit difference before one (another summation order) can move a value across "
            "a rounding boundary, by a whole step of that quantiser, so errors of a few steps "
            "of the output's quantiser are agreement"
        )
    unpools = _sized_max_unpools(model)
    if unpools:
        reasons.append(
            f"MaxUnpool with output_shape ({', '.join(unpools)}): onnxruntime places the values "
            "at their indices in output_shape's layout, the ONNX specification (its reference "
            "implementation and test data, and the converter) in the layout MaxPool saw; where "
            "output_shape is larger the two differ, and the converter's result is the "
            "specification's"
        )
    half = sorted({str(b.dtype) for b in expected if b.dtype.kind == "f" and b.itemsize < 4})
    if half:
        reasons.append(
            f"outputs are {'/'.join(half)}: two correct implementations differ by a few steps "
            f"of that precision, so the relative error's floor is {HALF_FLOOR_STEPS} of its "
            "steps of the largest output, not 1e-3 of it"
        )
    reason = "; ".join(reasons) or None
    try:
        max_abs, max_rel = _metrics(ours, expected)
    except ValueError as exc:
        return ConversionCheck(
            checked=True, reference=reference_name, reason=f"output mismatch: {exc}"
        )
    return ConversionCheck(
        checked=True,
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        reference=reference_name,
        reason=reason,
    )


def _sized_max_unpools(model: ModelProto) -> list[str]:
    """Names of the top-level MaxUnpool nodes given an output_shape."""
    return [
        node.name or node.output[0]
        for node in model.graph.node
        if node.op_type == "MaxUnpool" and len(node.input) > 2 and node.input[2]
    ]


def reference_failure(
    model: ModelProto, graph: ObservableGraph, inputs: Sequence[torch.Tensor]
) -> str | None:
    """Whether onnxruntime runs the model (with the graph's current weights) on `inputs`: None
    when it does, else the first line of its error. Raises `ReferenceUnavailable` when that
    cannot be told: onnxruntime cannot load the model, or takes no such inputs.

    For a forward of the converted graph that failed: if onnxruntime runs the same batch, the
    fault is the converter's, not the batch's (measure.py)."""
    try:
        feeds = {
            name: value.detach().cpu().numpy()
            for name, value in zip(graph.input_names, inputs, strict=True)
        }
    except (TypeError, ValueError) as exc:
        raise ReferenceUnavailable(f"inputs cannot be given to onnxruntime: {exc}") from exc
    kept = ConformanceReference()
    try:
        session = kept.session(model, graph, [PROVIDER])
        try:
            session.run(None, feeds)
        except Exception as exc:
            return first_line(exc)
        return None
    finally:
        kept.close()
