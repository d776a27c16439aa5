import sys

from yagg.cli import main

sys.exit(main())
