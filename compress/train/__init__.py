"""The one training loop, its objectives (cross-entropy, knowledge distillation) and DDP helpers."""
