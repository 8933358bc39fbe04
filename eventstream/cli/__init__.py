"""Command-line interface: one module per command, each with `register(subparsers)`."""
