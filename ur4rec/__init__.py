"""UR4Rec: a workbench for multimodal sequential recommendation."""

__version__ = "0.1.0"
