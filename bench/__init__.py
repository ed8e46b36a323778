"""GPU benchmark scripts of sh2 and the helpers they share (``bench.common``).

Run them from the repository root with the tree on the path, e.g. ``PYTHONPATH=$PWD python bench/ops.py``
(or ``python -m bench.ops``); ``bench/gpu_app.sh`` and ``bench/multi_gpu.sh`` run them in one go. This package
is not installed with sh2.
"""
