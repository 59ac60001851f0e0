"""Suite-wide settings: one intra-op thread per process.

The tests run many tiny models and spawn DDP workers; on a 2-core machine extra intra-op threads
only fight each other (the suite runs ~2x faster with one).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
