"""``python -m mirror``: the same entry point as the ``mirror`` console script."""

from mirror.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
