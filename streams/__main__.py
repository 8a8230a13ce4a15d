"""`python -m streams`: one stream worker process (see `streams.runner`)."""

import sys

from streams.runner import main

sys.exit(main())
