"""Deployment: ONNX export with parity checks, and latency benchmarks."""
