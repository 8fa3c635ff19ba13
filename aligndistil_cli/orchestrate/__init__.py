"""Running many stages: pipeline files (run), their plan (--dry-run, --only, --from, --until, --set), and sweeps with their summary."""
