"""`python -m forgeline_trainer --config <job config>`: see forgeline_trainer.launcher."""

import sys

from .launcher import main

sys.exit(main())
