"""adashift-pl: AdaShift (ICLR 2019) and the paper's benchmarks on PyTorch Lightning."""

__version__ = "0.1.0"
