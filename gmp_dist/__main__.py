import sys

from gmp_dist.cli import main

sys.exit(main())
