"""Test-wide settings."""

import torch

# The in-process references are tiny; one thread avoids oversubscribing the cores the spawned
# ranks (one thread each) are using.
torch.set_num_threads(1)
