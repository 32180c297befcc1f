"""python -m torch_ext {info, bench, check}"""

import sys

from torch_ext.cli import main

sys.exit(main())
