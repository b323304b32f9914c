"""com.microsoft QLinear* ops of onnxruntime's QOperator format. (Being written.)"""
