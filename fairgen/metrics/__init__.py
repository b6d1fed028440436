"""Evaluation metrics for fairgen generative models."""
