"""The observable graph: the one executable form every model format is turned into.

ONNX (via the converter), torch.export programs (via their FX graph) and, where possible,
TorchScript all become an `ObservableGraph`: an ordered list of `Node`s, each one torch callable,
over named values, with the trainable tensors held as `nn.Parameter`s of the module under
exactly the names the source model gives them.

Why one IR rather than hooks per format: the probes (statistics and gradient hooks on every
node output), the layer grouping (which node owns which parameters) and the fix transforms
(swap an activation, re-initialise a weight) are written once against this form.

Execution is a plain Python loop over the nodes. Per node it costs a dict lookup and a call;
for the models gradhealth looks at, that is far below the cost of the ops themselves
(see bench/converter.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
        held = [*(parameters or {}).values(), *(buffers or {}).values()]
        self.device: torch.device = held[0].device if held else torch.device("cpu")

    def _apply(self, fn: Callable[[torch.Tensor], Any], recurse: bool = True) -> ObservableGraph:
        moved = super()._apply(fn, recurse)
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
        values = self.initial_values()
        values.update(zip(self.input_names, inputs, strict=True))
        values[""] = None
        # Drop each value after its last reader, as eager PyTorch frees a temporary when its
        # last reference goes: otherwise every intermediate lives until the forward ends
        # (+30 % peak memory on a ResNet-50 step; bench/overhead.py). Autograd keeps what the
        # backward needs on its own.
        last_use: dict[str, int] = {}
        for index, node in enumerate(self.nodes):
            for name in node.inputs:
                last_use[name] = index
        keep = set(self.output_names)
        for index, node in enumerate(self.nodes):
            result = node.fn(*[values[name] for name in node.inputs])
            if len(node.outputs) == 1:
                outputs: Sequence[Any] = (result,)
            else:
                outputs = result
            for name, value in zip(node.outputs, outputs, strict=False):
                if name:
                    values[name] = value
            if observer is not None:
                observer(node, outputs)
            del result, outputs
            for name in (*node.inputs, *node.outputs):
                if name and name not in keep and last_use.get(name, -1) <= index:
                    values.pop(name, None)
        return [values[name] for name in self.output_names]

    def forward(self, *inputs: Any) -> Any:
        outputs = self.run(inputs, self.observer)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
