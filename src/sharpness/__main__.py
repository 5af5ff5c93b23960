"""``python -m sharpness``: run the embedded default job (see :mod:`sharpness.demo`)."""

from .demo import main

if __name__ == "__main__":
    main()
