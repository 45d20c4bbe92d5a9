"""Deployment: ONNX export with parity checks, TensorRT engines, and latency benchmarks.

`backends.bench` runs any bench backend (onnxruntime, tensorrt, trtexec, ssh); `timing` holds the
statistics they share.
"""
