"""One poprun instance under the test doubles: ``python tests/ipu_instance.py <vit-accel args>``.

Puts tests/poptorch_double.py and tests/popdist_double.py where ``import poptorch`` and
``import popdist`` find them, then runs the real CLI. The test starts several of these with
the variables poprun would give each instance (see popdist_double.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import popdist_double  # noqa: E402
import poptorch_double  # noqa: E402

sys.modules["poptorch"] = poptorch_double
sys.modules["popdist"] = popdist_double
sys.modules["popdist.poptorch"] = popdist_double.poptorch

from vit_accel.cli import main  # noqa: E402
from vit_accel.engine import distributed  # noqa: E402

if __name__ == "__main__":
    distributed.end_process(main(sys.argv[1:]))    # as the `vit-accel` command ends
