"""The lowest room: user-facing errors, the console the library prints through, hashing, YAML,
variant names. Imports nothing else of the package."""
