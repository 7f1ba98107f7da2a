"""MS-ILLM neural image compression in plain PyTorch."""

import warnings

# compressai imports torch_geometric, which calls the deprecated torch.jit.script at import time.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

__version__ = "0.1.0"
