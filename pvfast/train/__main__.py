"""``python -m pvfast.train``: see :mod:`pvfast.train.recipe`."""

import sys

from pvfast.train.recipe import main

if __name__ == "__main__":
    sys.exit(main())
