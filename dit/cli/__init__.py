"""Command-line entry points (thin: they parse arguments and call the library)."""
