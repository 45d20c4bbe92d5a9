"""Quantization: bucketed uniform quantizers, quantized distillation, size accounting."""
