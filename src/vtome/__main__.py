import sys

from vtome.cli import main

sys.exit(main())
