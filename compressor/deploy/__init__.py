"""Deployment: ONNX export (float and int8), ONNX evaluation, and latency measurement."""
