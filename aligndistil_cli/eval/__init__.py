"""Evaluation: reward scoring, in-training monitoring, reports with plots, exports for the standard judges."""
