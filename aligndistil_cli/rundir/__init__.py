"""Output directories: manifests and fingerprints, claiming and locking a directory, model cards, the Hub."""
