"""A .pt2 whose outputs are a container type this process does not have: a Hugging Face
model's ModelOutput, which transformers registers with torch's pytree where it is imported
(the exporting machine), not here. torch.export.load refused such a program ("Deserializing
… in pytree is not registered"); it is torch's operators only, so it loads, and its gradients
are the model's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.engine.formats import pytree_placeholders
from service.engine.formats.torch_export import load_torch_export

# A ModelOutput in miniature: an ordered dict of named tensors, registered as transformers
# registers its ModelOutput subclasses (values in order, keys as the context, a serialized
# type name of module and class)
_SAVE_WITH_A_DICT_OUTPUT = """
import sys, torch
import torch.utils._pytree as pytree
from collections import OrderedDict

class ClassifierOutput(OrderedDict):
    pass

pytree.register_pytree_node(
    ClassifierOutput,
    lambda o: (list(o.values()), list(o.keys())),
    lambda values, keys: ClassifierOutput(zip(keys, values)),
    serialized_type_name="mylib.outputs.ClassifierOutput",
)

class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(6, 5)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, x, labels):
        logits = self.head(torch.tanh(self.body(x)))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return ClassifierOutput(loss=loss, logits=logits)

model = Classifier()
x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
labels = torch.tensor([0, 2, 1, 0])
program = torch.export.export(model, (), kwargs={"x": x, "labels": labels})
torch.export.save(program, sys.argv[1])
model(x, labels)["loss"].backward()
torch.save({n: p.grad for n, p in model.named_parameters()}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def saved_elsewhere(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict]:
    folder = tmp_path_factory.mktemp("pytree")
    program, grads = folder / "classifier.pt2", folder / "grads.pt"
    subprocess.run(
        [sys.executable, "-c", _SAVE_WITH_A_DICT_OUTPUT, str(program), str(grads)],
        check=True,
        timeout=300,
    )
    return Path(program).read_bytes(), torch.load(grads)


def test_a_program_returning_an_unregistered_container_loads_with_the_models_gradients(
    saved_elsewhere: tuple[bytes, dict],
) -> None:
    data, expected = saved_elsewhere
    loaded = load_torch_export(data)
    assert "mylib.outputs.ClassifierOutput" in pytree_placeholders.placeholder_names()
    assert [s.name for s in loaded.inputs] == ["x", "labels"]
    # named by their keys in what the model returned, not by graph nodes (`linear_1`)
    assert [s.name for s in loaded.outputs] == ["loss", "logits"]
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    outputs = loaded.module(x, torch.tensor([0, 2, 1, 0]))
    loss = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    assert loss.dim() == 0
    loss.backward()
    grads = {n: p.grad for n, p in loaded.module.named_parameters()}
    assert set(grads) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad)


def test_a_second_load_reuses_the_stand_in(saved_elsewhere: tuple[bytes, dict]) -> None:
    data, _ = saved_elsewhere
    load_torch_export(data)
    load_torch_export(data)
    names = pytree_placeholders.placeholder_names()
    assert names.count("mylib.outputs.ClassifierOutput") == 1


def test_the_stand_in_unflattens_as_the_original_did() -> None:
    pytree_placeholders.register_placeholder("otherlib.Pair")
    (placeholder,) = [t for t in torch.utils._pytree.SUPPORTED_NODES if t.__name__ == "Pair"]
    spec = torch.utils._pytree.tree_structure(placeholder(a=1, b=2))
    assert torch.utils._pytree.tree_unflatten([3, 4], spec) == {"a": 3, "b": 4}
    assert not pytree_placeholders.register_placeholder("otherlib.Pair")
