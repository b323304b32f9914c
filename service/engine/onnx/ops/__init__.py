"""Op implementations, one module per family; importing this package registers them all."""

from service.engine.onnx.ops import (  # noqa: F401
    activation,
    attention,
    control,
    conv,
    elementwise,
    indexing,
    linalg,
    loss,
    microsoft,
    normalization,
    positional,
    quantize,
    random,
    recurrent,
    reduce,
    resize,
    sequence,
    shape,
    spectral,
    state_space,
)
