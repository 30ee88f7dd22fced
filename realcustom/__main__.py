import sys

from realcustom.cli import main

sys.exit(main())
