"""Pure loss functions, shapes in their docstrings, one family per module: functions (DPO and the AlignDistil
teacher), fused (the chunked output-head passes), preference (SimPO and TDPO)."""
