"""Names of the teacher variants, in a module of their own so that config (and so the CLI's
--help) can list them without importing torch through losses."""

VARIANTS = ("aligndistil", "contrastive", "theorem1", "adaptive")
NEEDS_REFERENCE = frozenset({"theorem1", "adaptive"})
