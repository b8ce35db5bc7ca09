"""``python -m adtr_anomalib.benchmark``: see :mod:`adtr_anomalib.benchmark`."""

import sys

from adtr_anomalib.benchmark import main

sys.exit(main())
