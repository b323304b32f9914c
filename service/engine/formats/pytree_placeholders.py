"""Stand-ins for the pytree node types a .pt2 names but this process does not have.

torch.export records how a program's inputs and outputs nest (its in/out specs) by the
registered name of each container type. A Hugging Face model returns a `ModelOutput` subclass
(`transformers.modeling_outputs.SequenceClassifierOutput`, …), which transformers registers
with torch's pytree when it is imported; gradhealth does not install transformers, so
`torch.export.load` of such a program failed ("Deserializing … in pytree is not registered").
The program itself is torch's operators only: the spec just needs some type under that name.
A stand-in is a dict with the same flatten/unflatten as ModelOutput's (values in order, keys as
the context), so the outputs keep their order and names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch.utils._pytree as pytree

_UNREGISTERED = re.compile(r"Deserializing (\S+) in pytree is not registered")

_placeholders: dict[str, type] = {}


def unregistered_type(message: str) -> str | None:
    """The serialized type name in torch's "not registered" deserialisation error, if
    `message` is that error."""
    match = _UNREGISTERED.search(message)
    return match.group(1) if match else None


def register_placeholder(serialized_name: str) -> bool:
    """Register a stand-in under `serialized_name`; False if one was registered already (the
    same error again means the stand-in did not help)."""
    if serialized_name in _placeholders:
        return False
    module, _, name = serialized_name.rpartition(".")
    placeholder = type(name or serialized_name, (dict,), {"__module__": module or __name__})
    pytree.register_pytree_node(
        placeholder,
        _flatten,
        _unflatten_as(placeholder),
        serialized_type_name=serialized_name,
        flatten_with_keys_fn=_flatten_with_keys,
    )
    _placeholders[serialized_name] = placeholder
    return True


def placeholder_names() -> list[str]:
    """The serialized names given stand-ins in this process."""
    return list(_placeholders)


def _flatten(value: dict[str, Any]) -> tuple[list[Any], list[str]]:
    return list(value.values()), list(value.keys())


def _flatten_with_keys(value: dict[Any, Any]) -> tuple[list[tuple[Any, Any]], list[Any]]:
    return [(pytree.MappingKey(k), v) for k, v in value.items()], list(value.keys())


def _unflatten_as(placeholder: type) -> Any:
    def unflatten(values: Iterable[Any], context: Any) -> Any:
        values = list(values)
        # ModelOutput's context is its keys; another library's may be anything
        if isinstance(context, list) and len(context) == len(values):
            return placeholder(zip(context, values, strict=True))
        return placeholder(enumerate(values))

    return unflatten
