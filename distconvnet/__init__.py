"""distconvnet: cuda-convnet2's cfg language, data formats and console, trained with PyTorch."""

__version__ = "0.1.0"
