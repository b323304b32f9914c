"""Op implementations, one module per family; importing this package registers them all."""

from service.engine.onnx.ops import attention, microsoft, recurrent  # noqa: F401
