"""The one training loop, its checkpoints, and the experiment trackers it mirrors metrics to."""
