"""Torch models, training, evaluation and ONNX/TensorRT export (placeholder)."""
