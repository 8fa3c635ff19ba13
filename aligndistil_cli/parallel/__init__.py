"""More than one process: rank, world size, reductions and barriers (distributed), and FSDP2 sharding (fsdp)."""
