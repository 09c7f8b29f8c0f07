"""Execution-time predictors: a roofline by default, measured profile tables where they exist."""

from moesim.perf.predictor import OpTime, Predictor, build_predictor

__all__ = ["OpTime", "Predictor", "build_predictor"]
