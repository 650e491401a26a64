"""``python -m glm_serve`` is ``glm2-serve``."""
import sys

from glm_serve.server import main

sys.exit(main())
