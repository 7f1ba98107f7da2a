"""MS-ILLM neural image compression in plain PyTorch."""

__version__ = "0.1.0"
