import sys

from realcustom.eval.cli import main

sys.exit(main())
