"""Serving a trained run: load it, evaluate it, predict images, and its MLflow pyfunc model."""
