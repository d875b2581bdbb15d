"""``python -m kdflow.train JOB.json``: what torchrun starts in every process (kdflow.launch.train_main)."""

import sys

from kdflow.launch import train_main

sys.exit(train_main())
