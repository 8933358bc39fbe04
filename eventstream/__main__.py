"""python -m eventstream → the CLI."""

from eventstream.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
