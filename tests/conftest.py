import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
# The test models are tiny: one thread avoids thread start-up costs that dominate their run time.
torch.set_num_threads(1)
