"""``python -m marrowdx`` is the same as the ``marrowdx`` console script."""

import sys

from marrowdx.cli import main

sys.exit(main())
