"""tuneloop: from a few hundred examples to a fine-tuned, evaluated, registered and served model."""

import os

__version__ = "0.1.0"

# oneDNN (PyTorch's CPU matmul library) caches a compiled kernel, with its own copy of the weights' layout,
# for every matmul shape it meets, up to 1024 of them. Training meets many shapes (packed rows of varying
# length), and the default cache grows by gigabytes over a run; 64 keeps the kernels in use and the memory
# flat at the same speed (benchmarks/RESULTS.md). Read when oneDNN first runs, so it is set on import;
# a value already in the environment wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
