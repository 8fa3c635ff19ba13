"""Every stage's options: the option groups, each stage's config built from them, and reading --config YAML."""
