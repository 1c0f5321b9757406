"""The torch networks (detector, classifier, diagnosis), in-graph ROI cropping and checkpoints.

Shared by training (which fits them) and export (which turns checkpoints into ONNX/TensorRT).
"""
