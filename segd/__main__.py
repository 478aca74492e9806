import sys

from segd.cli import main

sys.exit(main())
