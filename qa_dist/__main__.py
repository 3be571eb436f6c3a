import sys

# Before anything else is imported: under ``python -m`` the working directory is first on sys.path.
from qa_dist.runtime.safepath import drop_working_directory

drop_working_directory()

from qa_dist.cli import main  # noqa: E402

sys.exit(main())
