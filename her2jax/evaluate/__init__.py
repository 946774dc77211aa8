"""Evaluation: metrics with bootstrap confidence intervals, predictions and metrics files."""
