import sys

from roles.cli import main

sys.exit(main())
