"""Running many stages: pipeline files (run), their plan (--dry-run, --only, --from, --until, --set),
sweeps with their teacher selection and summary, and the published results."""
