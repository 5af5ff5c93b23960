"""``python -m sharpness``: the command line (see :mod:`sharpness.cli`)."""

from .cli import main

if __name__ == "__main__":
    main()
