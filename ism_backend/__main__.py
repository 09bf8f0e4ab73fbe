"""``python -m ism_backend`` runs the ismd daemon CLI (same as ``python -m ism_backend.daemon``)."""

import sys

from .daemon import main

if __name__ == "__main__":
    sys.exit(main())
