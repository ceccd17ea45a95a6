"""``python -m cahfp.cli``: the ``cahfp`` command (as the tests and the systemd units run it)."""

import sys

from cahfp.cli import main

sys.exit(main())
