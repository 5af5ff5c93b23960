"""``python -m sharpness``: run the embedded default job (see :mod:`sharpness.demo`)."""

import sys

from .demo import main

if __name__ == "__main__":
    sys.exit(main())
