import sys

from ..cli import replicate_main

sys.exit(replicate_main())
