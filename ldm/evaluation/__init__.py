"""Evaluation of trained models (metrics computed on held-out data)."""

from ldm.evaluation.reconstruction import evaluate_reconstruction

__all__ = ["evaluate_reconstruction"]
