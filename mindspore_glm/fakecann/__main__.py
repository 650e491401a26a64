"""``python -m mindspore_glm.fakecann``: build the stand-in CANN libraries (if needed) and print their folder."""
import sys

from mindspore_glm.fakecann import main

sys.exit(main())
