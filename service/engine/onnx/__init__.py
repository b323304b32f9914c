"""ONNX → differentiable PyTorch: the converter that gives ONNX models a backward pass."""
