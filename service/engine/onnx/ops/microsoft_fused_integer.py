"""com.microsoft fused integer ops of optimised and dynamically quantised models. (Being written.)"""
