"""The one-shot GPU check (python -m node.gpu_check): tests that need a CUDA device."""
