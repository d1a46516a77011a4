"""Evaluation and inference: load a trained model, predict, metrics, bias correction."""
