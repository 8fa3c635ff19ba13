"""Models: loading and saving, padding-free packing, sampling with a KV cache."""
