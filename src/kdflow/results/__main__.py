"""``python -m kdflow.results``."""

import sys

from kdflow.results.cli import main

sys.exit(main())
