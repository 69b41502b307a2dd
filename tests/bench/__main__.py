"""``python -m tests.bench [--quick]``: the mirror against CNCF Distribution's proxy and nginx, side by side."""

import sys

from tests.bench.run import main

sys.exit(main())
