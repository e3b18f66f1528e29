"""``python -m lens_train.reproduction``: the tables' command line (:func:`.reproduce.main`)."""

import sys

from .reproduce import main

sys.exit(main())
