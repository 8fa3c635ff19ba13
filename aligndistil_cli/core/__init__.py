"""The lowest room: user-facing errors, the console the library prints through, hashing, variant names. Imports nothing of the package."""
