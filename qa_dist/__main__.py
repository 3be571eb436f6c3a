import sys

from qa_dist.cli import main

sys.exit(main())
