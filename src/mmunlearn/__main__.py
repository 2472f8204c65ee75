import sys

from mmunlearn.cli import main

sys.exit(main())
