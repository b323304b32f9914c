"""Control flow: If, Loop, Scan, run through converted subgraphs (see convert.py's docstring).

Bodies read outer-scope values through `outer`; the converter lists those values as extra
inputs of the node, so a body's dependencies are visible in the graph's node list.
"""

from __future__ import annotations

from typing import Any

import torch

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import norm_axis, require, scalar
from service.engine.onnx.registry import OpContext, register


def _subgraph(ctx: OpContext, name: str) -> Any:
    graph = ctx.attr(name)
    require(graph is not None, f"missing subgraph attribute '{name}'")
    assert ctx.convert_subgraph is not None
    return ctx.convert_subgraph(graph)


def _single(outputs: list[Any], count: int) -> Any:
    return outputs[0] if count == 1 else tuple(outputs)


@register("If")
def if_(ctx: OpContext) -> NodeFn:
    then_branch = _subgraph(ctx, "then_branch")
    else_branch = _subgraph(ctx, "else_branch")
    count = ctx.num_outputs

    def fn(cond: torch.Tensor, *, outer: dict[str, Any]) -> Any:
        branch = then_branch if bool(scalar(cond)) else else_branch
        return _single(branch([], outer), count)

    return fn


@register("Loop")
def loop(ctx: OpContext) -> NodeFn:
    body = _subgraph(ctx, "body")
    carried = ctx.num_inputs - 2
    count = ctx.num_outputs

    def fn(trip: Any, cond: Any, *initial: Any, outer: dict[str, Any]) -> Any:
        limit = int(scalar(trip)) if trip is not None else None
        keep = bool(scalar(cond)) if cond is not None else True
        values = list(initial)
        scans: list[list[torch.Tensor]] = []
        i = 0
        while keep and (limit is None or i < limit):
            outs = body([torch.tensor(i, dtype=torch.int64), torch.tensor(keep), *values], outer)
            keep = bool(scalar(outs[0]))
            values = list(outs[1 : 1 + carried])
            steps = outs[1 + carried :]
            if not scans:
                scans = [[] for _ in steps]
            for store, value in zip(scans, steps, strict=True):
                store.append(value)
            i += 1
        stacked = [torch.stack(s) for s in scans]
        missing = count - carried - len(stacked)
        stacked += [torch.empty(0)] * max(missing, 0)  # no iteration ran
        return _single(values + stacked, count)

    return fn


@register("Scan", since=9)
def scan(ctx: OpContext) -> NodeFn:
    body = _subgraph(ctx, "body")
    n_scan = int(ctx.attr("num_scan_inputs"))
    n_state = ctx.num_inputs - n_scan
    in_axes = list(ctx.attr("scan_input_axes", [0] * n_scan))
    in_dirs = list(ctx.attr("scan_input_directions", [0] * n_scan))
    n_out = ctx.num_outputs - n_state
    out_axes = list(ctx.attr("scan_output_axes", [0] * n_out))
    out_dirs = list(ctx.attr("scan_output_directions", [0] * n_out))
    count = ctx.num_outputs

    def fn(*args: Any, outer: dict[str, Any]) -> Any:
        states = list(args[:n_state])
        sequences = list(args[n_state:])
        axes = [norm_axis(a, s.dim()) for a, s in zip(in_axes, sequences, strict=True)]
        length = sequences[0].shape[axes[0]]
        collected: list[list[torch.Tensor]] = [[] for _ in range(n_out)]
        for t in range(length):
            slices = [
                s.select(a, length - 1 - t if d else t)
                for s, a, d in zip(sequences, axes, in_dirs, strict=True)
            ]
            outs = body(states + slices, outer)
            states = list(outs[:n_state])
            for store, value in zip(collected, outs[n_state:], strict=True):
                store.append(value)
        results = []
        for store, axis, direction in zip(collected, out_axes, out_dirs, strict=True):
            if direction:
                store = store[::-1]
            stacked = torch.stack(store)
            results.append(stacked.movedim(0, norm_axis(axis, stacked.dim())))
        return _single(states + results, count)

    return fn
