import sys

from sugard.cli import main

sys.exit(main())
