"""Feature distillation across architectures: taps, projectors, losses and the objectives using them.

Everything here is training-only: projectors live in the objective, never in the student.
"""
