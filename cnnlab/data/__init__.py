"""Datasets: where the images come from, and how they reach the model in batches."""
