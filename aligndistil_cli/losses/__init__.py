"""Pure loss functions with their tensor shapes in their docstrings, one family per module."""
