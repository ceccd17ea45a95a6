"""python -m benchmarks.system"""

import sys

from benchmarks.system import main

sys.exit(main())
