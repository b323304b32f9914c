"""The observable graph: the one executable form every model format is turned into.

ONNX (via the converter), torch.export programs (via their FX graph) and, where possible,
TorchScript all become an `ObservableGraph`: an ordered list of `Node`s, each one torch callable,
over named values, with the trainable tensors held as `nn.Parameter`s of the module under
exactly the names the source model gives them.

Why one IR rather than hooks per format: the probes (statistics and gradient hooks on every
node output), the layer grouping (which node owns which parameters) and the fix transforms
(swap an activation, re-initialise a weight) are written once against this form.

Execution is a plain Python loop over the nodes, over a list of value slots planned once per
graph structure (`_RunPlan`): per node a call plus a few list reads and writes. On a GPU the
host time per node is what the device waits for (a 12-layer transformer export has ~1900
nodes), so the loop does nothing per node that can be done once (bench/converter.py
--host-overhead).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import is_
from typing import Any, Protocol

import torch
from torch import nn

NodeFn = Callable[..., Any]

# The value name under which a node can read the device the graph's tensors are on now (a
# `torch.device`; `ObservableGraph.device`). Nodes that create tensors from nothing, such as an
# exported program's `aten.zeros(..., device=cpu)` for an RNN's initial state, list it as an
# input so that they follow `.to(device)`: the device written into the graph is the one it was
# traced on, not the one it runs on.
DEVICE_VALUE = "gradhealth::device"


@dataclass
class Node:
    """One op of the source graph.

    `fn(*input_values)` returns one value, or a tuple/list with one entry per name in `outputs`.
    `inputs` are value names; "" marks an omitted optional input (passed to `fn` as None).
    `source` keeps what a transform or an error message needs of the original node
    (ONNX NodeProto, FX node, ...), never used while running.
    `scope`: the dotted path of the source module the op came from (`blocks.0.attn`), when the
    exporter recorded it (dynamo ONNX `pkg.torch.onnx.name_scopes`, FX `nn_module_stack`);
    None when unknown or at the top level.

    `fn`, `inputs` and `outputs` may be reassigned at any time (a transform swapping an
    activation): `ObservableGraph.run` notices and plans again. Assign new lists rather than
    editing them in place once the graph has run: an in-place edit goes unnoticed.
    """

    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    fn: NodeFn
    domain: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)
    source: Any = None
    scope: str | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WIRING_FIELDS and name in self.__dict__:
            _wiring_changed()
        object.__setattr__(self, name, value)


# Bumped whenever a node's fn, inputs or outputs are reassigned: a run plan made before is
# stale (checking every node's wiring per call instead costs ~0.2 ms on a 1900-node graph).
_WIRING_FIELDS = frozenset({"fn", "inputs", "outputs"})
_wiring_version = 0


def _wiring_changed() -> None:
    global _wiring_version
    _wiring_version += 1


class ConstantResult:
    """A node fn whose result was fixed at conversion (a folded shape computation).

    `run()` places `value` among the graph's initial values and, with no observer attached,
    does not call the node at all; with an observer the node is called (it returns `value`)
    and observed in its place as before. Replacing `node.fn` (a transform) makes the node run
    again like any other.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __call__(self, *args: Any) -> Any:
        return self.value


def passthrough(value: Any, *ignored: Any) -> Any:
    """A node fn that returns its first input (a Constant node reading its stored value, an
    Identity, an inactive Dropout): `run()` gives its one output the input's slot instead of
    calling it, unless an observer is attached."""
    return value


@dataclass(eq=False)
class FusedNodes:
    """Nodes that one call computes when nobody observes them.

    A format's converter finds them (onnx/fusions.py: an attention's MatMul → Softmax →
    MatMul as `F.scaled_dot_product_attention`, a MatMul by a weight plus its bias as one
    `F.linear`): the fused kernels are what the source framework ran, and the nodes in
    between are intermediate values nothing else reads. With an observer attached every node
    runs and is observed as before; without one the run plan calls `fn` with the values of
    `inputs` at the position of the last node, which produces `output`.

    `nodes` are recorded with their `fns` and wiring when found: a transform that swaps a
    fn or rewires a node, or a new reader of an intermediate value, leaves the nodes
    unfused (checked each time the plan is made). `device_types`: where the group is fused
    (the device the graph is on when the plan is made; elsewhere its nodes run).
    """

    op_type: str
    nodes: tuple[Node, ...]
    inputs: tuple[str, ...]
    output: str
    fn: NodeFn
    device_types: frozenset[str]
    fns: tuple[NodeFn, ...] = ()
    wiring: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        self.fns = tuple(node.fn for node in self.nodes)
        self.wiring = tuple((tuple(n.inputs), tuple(n.outputs)) for n in self.nodes)

    def unchanged(self) -> bool:
        """Whether every node still has the fn and the wiring it had when this was found."""
        return all(
            node.fn is fn and (tuple(node.inputs), tuple(node.outputs)) == wired
            for node, fn, wired in zip(self.nodes, self.fns, self.wiring, strict=True)
        )


class NodeObserver(Protocol):
    """Called after each node with its output values, in execution order."""

    def __call__(self, node: Node, outputs: Sequence[Any]) -> None: ...


def _register_dotted(
    root: nn.Module, dotted: str, tensor: torch.Tensor, *, parameter: bool
) -> None:
    """Register `tensor` so that `named_parameters()`/`named_buffers()` yield exactly `dotted`.

    Names like `layer1.0.conv1.weight` become nested submodules; `nn.Module` refuses dots in a
    single attribute name, and the report must use the source model's names unchanged.
    """
    *path, leaf = dotted.split(".")
    module = root
    for part in path:
        child = module._modules.get(part)
        if child is None:
            child = nn.Module()
            module.add_module(part, child)
        module = child
    if parameter:
        module.register_parameter(
            leaf, tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor)
        )
    else:
        module.register_buffer(leaf, tensor)


def _lookup_dotted(root: nn.Module, dotted: str) -> torch.Tensor:
    *path, leaf = dotted.split(".")
    module = root
    for part in path:
        module = module._modules[part]  # type: ignore[assignment]
    value = getattr(module, leaf)
    assert isinstance(value, torch.Tensor)
    return value


def _is_registrable(name: str) -> bool:
    return bool(name) and all(
        (part and part.isidentifier()) or part.isdigit() for part in name.split(".")
    )


class ObservableGraph(nn.Module):
    """An `nn.Module` whose forward runs `nodes` in order and can report every node output.

    - `parameters`: value name → trainable tensor. Registered under the value name when it is a
      valid dotted module path, else under a sanitised name recorded in `param_names`
      (value name → name in `named_parameters()`); the report uses the value name.
    - `buffers`: value name → non-trainable tensor (integer initializers, constants).
    - `constants`: value name → any Python/torch value that is not a tensor state (e.g. a shape).
    - `input_names` / `output_names`: the graph's external inputs and outputs, in order.
    - `device`: where the parameters and buffers are now (kept up to date by `.to()`, `.cuda()`,
      ...; every move goes through `_apply`); nodes read it as the value `DEVICE_VALUE`.
    - `input_shape_nodes`: names of nodes whose outputs are fixed by the shapes, dtypes and
      device of the graph inputs alone (shape arithmetic an exporter wrote: `Shape → Slice →
      Concat`): `run()` computes them on the first call with given input shapes and reuses
      their values on later calls with the same (still handing them to the observer). The
      format's converter says which (onnx/shape_values.py); empty: all run every call.
    - `fusions`: groups of nodes computed by one call when no observer is attached
      (`FusedNodes`); empty: every node runs.
    """

    def __init__(
        self,
        nodes: list[Node],
        *,
        input_names: list[str],
        output_names: list[str],
        parameters: dict[str, torch.Tensor] | None = None,
        buffers: dict[str, torch.Tensor] | None = None,
        constants: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        input_shape_nodes: Iterable[str] = (),
        fusions: Iterable[FusedNodes] = (),
    ) -> None:
        super().__init__()
        self.nodes = nodes
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.constants: dict[str, Any] = dict(constants or {})
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.param_names: dict[str, str] = {}
        self.buffer_names: dict[str, str] = {}
        for i, (value_name, tensor) in enumerate((parameters or {}).items()):
            self.param_names[value_name] = self._register(value_name, f"param_{i}", tensor, True)
        for i, (value_name, tensor) in enumerate((buffers or {}).items()):
            self.buffer_names[value_name] = self._register(value_name, f"buffer_{i}", tensor, False)
        self.observer: NodeObserver | None = None
        self.input_shape_nodes = frozenset(input_shape_nodes)
        self.fusions: list[FusedNodes] = list(fusions)
        held = [*(parameters or {}).values(), *(buffers or {}).values()]
        self.device: torch.device = held[0].device if held else torch.device("cpu")

    def _apply(self, fn: Callable[[torch.Tensor], Any], recurse: bool = True) -> ObservableGraph:
        moved = super()._apply(fn, recurse)
        self.__dict__.pop("_plan", None)  # buffers were replaced: the plan holds their owners
        # `fn` is the move itself (`.to(device)`, `.cuda()`, `.half()`, ...): applied to an
        # empty tensor it says where tensors go, also for a graph that holds none
        probe = fn(torch.empty(0, device=self.device))
        if isinstance(probe, torch.Tensor):
            self.device = probe.device
        return moved

    def _register(self, name: str, fallback: str, tensor: torch.Tensor, parameter: bool) -> str:
        if _is_registrable(name):
            try:
                _register_dotted(self, name, tensor, parameter=parameter)
                return name
            except (KeyError, AttributeError, TypeError):
                pass  # clashes with a module attribute or a sibling path: use the fallback
        _register_dotted(self, fallback, tensor, parameter=parameter)
        return fallback

    def parameter(self, value_name: str) -> torch.Tensor:
        return _lookup_dotted(self, self.param_names[value_name])

    def named_graph_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(source name, parameter) pairs: the names the report uses."""
        return [(v, self.parameter(v)) for v in self.param_names]  # type: ignore[misc]

    def initial_values(self) -> dict[str, Any]:
        values: dict[str, Any] = dict(self.constants)
        values[DEVICE_VALUE] = self.device
        for value_name, registered in self.buffer_names.items():
            values[value_name] = _lookup_dotted(self, registered)
        for value_name, registered in self.param_names.items():
            values[value_name] = _lookup_dotted(self, registered)
        return values

    def run(self, inputs: Sequence[Any], observer: NodeObserver | None = None) -> list[Any]:
        """Execute the graph; return the values of `output_names` in order."""
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"graph takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                f"got {len(inputs)}"
            )
        plan = self._run_plan()
        schedule, signature = plan.base, None
        if plan.input_shape_steps:
            signature = _signature(inputs, self.device)
            schedule = plan.by_signature.get(signature, plan.base) if signature else plan.base
        slots = schedule.template.copy()
        slots[plan.device_slot] = self.device
        for slot, owner, leaf in plan.state:
            slots[slot] = owner[leaf]
        for slot, value in zip(plan.input_slots, inputs, strict=True):
            slots[slot] = value
        if signature is not None and schedule is plan.base:
            # first call with these input shapes: run everything, keep what they fix
            captured = plan.base.run_observed(slots, observer, plan.input_shape_steps)
            plan.remember(signature, captured)
        elif observer is None:
            for node, reads, writes, frees in schedule.computing:
                result = node.fn(*[slots[i] for i in reads])
                if len(writes) == 1:
                    slots[writes[0]] = result
                else:
                    for i, value in zip(writes, result, strict=False):
                        slots[i] = value
                del result
                for i in frees:
                    slots[i] = None
        else:
            schedule.run_observed(slots, observer, ())
        return [slots[i] for i in plan.output_slots]

    def _run_plan(self) -> _RunPlan:
        """The slot plan for the current nodes; rebuilt when a node, its wiring or its fn
        changed since it was made (transforms swap fns in place), or for a copy of the graph
        (`copy.deepcopy` carries the plan along; it names the graph it was made for)."""
        plan: _RunPlan | None = self.__dict__.get("_plan")
        nodes = self.nodes
        if plan is None or not plan.matches(self, nodes):
            plan = _RunPlan(self, nodes)
            self.__dict__["_plan"] = plan
        return plan

    def forward(self, *inputs: Any) -> Any:
        outputs = self.run(inputs, self.observer)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


# Slot 0 always holds None (an omitted optional input, ""); slot 1 receives outputs named "".
_NONE_SLOT, _SINK_SLOT = 0, 1
# Values reused across calls with the same input shapes are small shape arithmetic; a larger
# one (a mask built from a shape) is computed per call rather than held between calls.
REUSED_VALUE_MAX_NUMEL = 1 << 16
# Input signatures remembered per graph (a worker sees few batch shapes per model).
MAX_SIGNATURES = 8

Step = tuple[Node, tuple[int, ...], tuple[int, ...], tuple[int, ...]]


class _Schedule:
    """What one call executes: `template` (slot values set before the first node), `every`
    node in order with the outputs known in advance (None: compute them), and `computing`,
    the steps left when nobody observes (known outputs are already in the template; values
    they would clear are cleared by the step before them instead)."""

    def __init__(
        self,
        template: list[Any],
        steps: list[Step],
        known: dict[int, tuple[Any, ...]],
        fused: _FusedSteps | None = None,
    ) -> None:
        self.template = template
        self.every = [(*step, known.get(index)) for index, step in enumerate(steps)]
        if fused is not None:  # unobserved, the fused steps run in place of their nodes
            placed = fused.index
            known = {at: v for i, v in known.items() if (at := placed[i]) is not None}
            steps = fused.steps
        self.computing: list[Step] = []
        pending: tuple[int, ...] = ()
        for index, (node, reads, writes, frees) in enumerate(steps):
            if index in known or (
                node.fn is passthrough and len(writes) == 1 and writes[0] == reads[0]
            ):
                pending += frees
                continue
            self.computing.append((node, reads, writes, pending + frees))
            pending = ()

    def run_observed(
        self, slots: list[Any], observer: NodeObserver | None, capture: frozenset[int] | tuple
    ) -> dict[int, tuple[Any, ...]]:
        """Every node in order, each handed to `observer`; returns the outputs of the steps
        in `capture`."""
        captured: dict[int, tuple[Any, ...]] = {}
        for index, (node, reads, writes, frees, known) in enumerate(self.every):
            if known is None:
                result = node.fn(*[slots[i] for i in reads])
                outputs: Sequence[Any] = (result,) if len(writes) == 1 else result
                for i, value in zip(writes, outputs, strict=False):
                    slots[i] = value
                del result
            else:
                outputs = known
            if index in capture:
                captured[index] = tuple(outputs)
            if observer is not None:
                observer(node, outputs)
            del outputs
            for i in frees:
                slots[i] = None
        return captured


class _RunPlan:
    """`ObservableGraph.run` over a list of slots instead of a dict of names.

    Made once per graph structure: one slot per value name, per node the slots it reads and
    writes and the slots to clear after it (values whose last reader it is: eager PyTorch
    frees a temporary when its last reference goes; without this every intermediate lives
    until the forward ends, +30 % peak memory on a ResNet-50 step, bench/overhead.py; autograd
    keeps what the backward needs on its own). The template holds what never changes per call
    (constants, folded results); parameters and buffers are read from their modules per call,
    so in-place updates and re-registered tensors are seen. Per input signature, a schedule
    that also knows the outputs of `graph.input_shape_nodes` from the first call with it.
    """

    def __init__(self, graph: ObservableGraph, nodes: list[Node]) -> None:
        self.graph_id = id(graph)
        self.wiring_version = _wiring_version
        self.nodes = list(nodes)
        self.constants_key = (id(graph.constants), len(graph.constants))
        self.shape_nodes = graph.input_shape_nodes
        slot_of: dict[str, int] = {"": _NONE_SLOT}
        template: list[Any] = [None, None]

        def new_slot(name: str, value: Any = None) -> int:
            slot_of[name] = len(template)
            template.append(value)
            return slot_of[name]

        for name, value in graph.constants.items():
            new_slot(name, value)
        self.device_slot = new_slot(DEVICE_VALUE)
        self.state: list[tuple[int, dict[str, Any], str]] = []
        for names, parameter in ((graph.buffer_names, False), (graph.param_names, True)):
            for value_name, registered in names.items():
                owner, leaf = _owner_of(graph, registered)
                table = owner._parameters if parameter else owner._buffers
                slot = slot_of.get(value_name)
                self.state.append((new_slot(value_name) if slot is None else slot, table, leaf))
        self.input_slots = [slot_of.get(n) or new_slot(n) for n in graph.input_names]

        wired: list[tuple[Node, tuple[int, ...], tuple[int, ...]]] = []
        known: dict[int, tuple[Any, ...]] = {}
        for node in nodes:
            reads = tuple(_read_slot(slot_of, name, node) for name in node.inputs)
            if node.fn is passthrough and reads and len(node.outputs) == 1:
                slot_of.setdefault(node.outputs[0], reads[0])  # the output is its input
            writes = tuple(
                (slot_of.get(name) or new_slot(name)) if name else _SINK_SLOT
                for name in node.outputs
            )
            if isinstance(node.fn, ConstantResult):
                outputs = tuple(_as_outputs(node, node.fn.value))
                known[len(wired)] = _place(template, writes, outputs)
            wired.append((node, reads, writes))
        self.output_slots = [_read_slot(slot_of, name, None) for name in graph.output_names]

        kept = {_NONE_SLOT, _SINK_SLOT, *self.output_slots}
        self.steps = _with_frees(wired, kept)
        self.fusions_key = (id(graph.fusions), len(graph.fusions))
        fused = _fused_wiring(graph, wired, slot_of, kept)  # for graph.device
        self.fused = None if fused is None else _FusedSteps(_with_frees(fused[0], kept), fused[1])
        self.known = known
        self.base = _Schedule(template, self.steps, known, self.fused)
        self.input_shape_steps = frozenset(
            index
            for index, (node, _, _, _) in enumerate(self.steps)
            if node.name in self.shape_nodes and index not in known
        )
        self.by_signature: dict[Hashable, _Schedule] = {}

    def matches(self, graph: ObservableGraph, nodes: list[Node]) -> bool:
        return (
            self.graph_id == id(graph)
            and self.wiring_version == _wiring_version
            and self.shape_nodes is graph.input_shape_nodes
            and self.constants_key == (id(graph.constants), len(graph.constants))
            and self.fusions_key == (id(graph.fusions), len(graph.fusions))
            and len(nodes) == len(self.nodes)
            and all(map(is_, nodes, self.nodes))
        )

    def remember(self, signature: Hashable, captured: dict[int, tuple[Any, ...]]) -> None:
        """A schedule for `signature` that places the captured outputs instead of computing
        them (outputs too large to hold between calls, or not tensors, are computed)."""
        template = self.base.template.copy()
        known = dict(self.known)
        for index, outputs in captured.items():
            if all(_reusable(value) for value in outputs):
                _, _, writes, _ = self.steps[index]
                known[index] = _place(template, writes, outputs)
        if len(self.by_signature) >= MAX_SIGNATURES:
            self.by_signature.clear()
        self.by_signature[signature] = _Schedule(template, self.steps, known, self.fused)


Wired = tuple[Node, tuple[int, ...], tuple[int, ...]]


@dataclass
class _FusedSteps:
    """The steps an unobserved call runs where `graph.fusions` apply, and per step of the
    plan its index among them (None: a fused node, computed by its group's step)."""

    steps: list[Step]
    index: list[int | None]


def _with_frees(wired: list[Wired], kept: set[int]) -> list[Step]:
    """Each step with the slots to clear after it: the values whose last reader it is."""
    last_use: dict[int, int] = {}
    for index, (_, reads, _) in enumerate(wired):
        for slot in reads:
            last_use[slot] = index
    return [
        (
            node,
            reads,
            writes,
            tuple(
                slot
                for slot in dict.fromkeys((*reads, *writes))
                if slot not in kept and last_use.get(slot, -1) <= index
            ),
        )
        for index, (node, reads, writes) in enumerate(wired)
    ]


def _fused_wiring(
    graph: ObservableGraph, wired: list[Wired], slot_of: dict[str, int], kept: set[int]
) -> tuple[list[Wired], list[int | None]] | None:
    """The wiring with each usable fusion's nodes replaced by one step at the last one's
    place, and the index map for `_FusedSteps`; None when no fusion applies. A fusion is
    usable while its nodes are all in the graph as they were found, none is folded or
    fixed by the input shapes, and nothing outside it reads its intermediate values."""
    if not graph.fusions:
        return None
    position = {id(node): index for index, (node, _, _) in enumerate(wired)}
    readers: dict[int, set[int]] = {}
    for index, (_, reads, _) in enumerate(wired):
        for slot in reads:
            readers.setdefault(slot, set()).add(index)
    covered: set[int] = set()
    replaced: dict[int, Wired] = {}
    for fusion in graph.fusions:
        indices = [position.get(id(node)) for node in fusion.nodes]
        if None in indices or graph.device.type not in fusion.device_types:
            continue
        if not fusion.unchanged():
            continue
        group = {i for i in indices if i is not None}
        last = max(group)
        output = slot_of.get(fusion.output)
        if (
            group & covered
            or any(
                isinstance(node.fn, ConstantResult)
                or node.fn is passthrough
                or node.name in graph.input_shape_nodes
                for node in fusion.nodes
            )
            or output is None
            or wired[last][2] != (output,)
            or any(name not in slot_of for name in fusion.inputs)
        ):
            continue
        inner = {slot for i in group for slot in wired[i][2] if slot not in (output, _SINK_SLOT)}
        if inner & kept or any(readers.get(slot, set()) - group for slot in inner):
            continue
        step = Node(
            name=fusion.nodes[-1].name,
            op_type=fusion.op_type,
            inputs=list(fusion.inputs),
            outputs=[fusion.output],
            fn=fusion.fn,
        )
        replaced[last] = (step, tuple(slot_of[name] for name in fusion.inputs), (output,))
        covered |= group
    if not replaced:
        return None
    steps: list[Wired] = []
    placed: list[int | None] = []
    for i, wiring in enumerate(wired):
        if i in covered and i not in replaced:
            placed.append(None)
            continue
        placed.append(len(steps))
        steps.append(replaced.get(i, wiring))
    return steps, placed


def _signature(inputs: Sequence[Any], device: torch.device) -> Hashable | None:
    """What fixes the values of `input_shape_nodes`; None when an input is no tensor."""
    key: list[Any] = [device, torch.is_autocast_enabled(device.type)]
    for value in inputs:
        if not isinstance(value, torch.Tensor):
            return None
        key.append((value.shape, value.dtype, value.device))
    if key[1]:
        key.append(torch.get_autocast_dtype(device.type))
    return tuple(key)


def _reusable(value: Any) -> bool:
    return value is None or (
        isinstance(value, torch.Tensor)
        and not value.requires_grad
        and value.numel() <= REUSED_VALUE_MAX_NUMEL
    )


def _place(
    template: list[Any], writes: tuple[int, ...], outputs: tuple[Any, ...]
) -> tuple[Any, ...]:
    for slot, value in zip(writes, outputs, strict=False):
        if slot != _SINK_SLOT:
            template[slot] = value
    return outputs


def _as_outputs(node: Node, result: Any) -> Sequence[Any]:
    return (result,) if len(node.outputs) == 1 else result


def _read_slot(slot_of: dict[str, int], name: str, node: Node | None) -> int:
    slot = slot_of.get(name)
    if slot is None:
        where = f"node {node.name!r} ({node.op_type})" if node is not None else "graph output"
        raise KeyError(f"{where} reads {name!r}, which no input, state or earlier node provides")
    return slot


def _owner_of(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, leaf = dotted.split(".")
    module = root
    for part in path:
        module = module._modules[part]  # type: ignore[assignment]
    return module, leaf
