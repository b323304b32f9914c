"""Model inputs the exported graph never reads, said in a note.

The common cause is torch.export's: one tensor passed as two arguments becomes ONE graph
input, and every use of both goes to it. Hugging Face's causal-LM idiom does exactly that,
`model(input_ids, labels=input_ids)`: the program then embeds `labels` and never reads
`input_ids` (seen on BLOOM, OPT, GPT-2 exported with torch.export or the dynamo ONNX
exporter). With a batch whose labels equal its input_ids the diagnosis is unaffected; with
labels that differ (-100 on padding, shifted targets) the model would embed the labels, and
the user needs to know to export with `labels=input_ids.clone()`.
"""

from __future__ import annotations

import torch

from service.engine.graph import ObservableGraph


def unread_input_notes(
    graph: ObservableGraph, names: list[str], inputs: list[torch.Tensor]
) -> list[str]:
    """A note per graph input no node reads (and no output is), naming a read input of the
    same shape and dtype that probably took its uses."""
    read = {value for node in graph.nodes for value in node.inputs} | set(graph.output_names)
    notes: list[str] = []
    count = min(len(graph.input_names), len(names), len(inputs))
    for i in range(count):
        if graph.input_names[i] in read:
            continue
        candidates = [
            j
            for j in range(count)
            if j != i
            and graph.input_names[j] in read
            and inputs[j].shape == inputs[i].shape
            and inputs[j].dtype == inputs[i].dtype
        ]
        # the batch's equal array is the likely twin (the same tensor at export); else the
        # one candidate, if there is only one
        equal = [j for j in candidates if torch.equal(inputs[j], inputs[i])]
        twin = equal[0] if equal else candidates[0] if len(candidates) == 1 else None
        if twin is None:
            others = f" ({', '.join(repr(names[j]) for j in candidates)} have its shape)"
            notes.append(
                f"the model does not read its input {names[i]!r}: the exported graph has no "
                f"use for it{others if candidates else ''}; if it was passed as the same tensor "
                "as another argument at export (labels=input_ids), torch.export made them one "
                "input: export with separate tensors (labels=input_ids.clone())"
            )
            continue
        consequence = (
            f"the batch's {names[twin]!r} equals its {names[i]!r}, so this diagnosis is unaffected"
            if equal
            else f"the batch's {names[twin]!r} differs from its {names[i]!r}, so the model "
            f"here reads {names[twin]!r} where yours reads {names[i]!r}"
        )
        notes.append(
            f"the model does not read its input {names[i]!r}, and reads {names[twin]!r} (same "
            "shape and dtype) probably in its place: torch.export makes one tensor passed as "
            f"two arguments (labels=input_ids) one input; {consequence}. Export with "
            "separate tensors (labels=input_ids.clone()) to keep them apart"
        )
    return notes
