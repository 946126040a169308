"""Shared pytest set-up."""

import os

import torch

# Under pytest-xdist every worker would start one torch thread per core: on a 2-core machine two
# workers then oversubscribe and individual tests slow down ~10x.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
