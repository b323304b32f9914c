"""Model formats: content detection and loaders that turn each format into an ObservableGraph.

- `detect.detect_format(data)`: which format the bytes are (never from a file name).
- `torch_export.load_torch_export(data, ...)`: `.pt2` programs through their FX graph.
- `torchscript.load_torchscript(data, ...)`: `torch.jit.load`, made observable through
  `torch._export.converter` when it can be, else parameter gradients only.
- `onnx.load_onnx_model(data, ...)`: glue to the ONNX converter (service/engine/onnx).
"""
