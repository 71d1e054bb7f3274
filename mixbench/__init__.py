"""mixbench: one training harness to compare mixup-family augmentations on timm CNNs."""

__version__ = "0.1.0"


class UsageError(ValueError):
    """Bad user input: the CLI prints the message on one line and exits with status 2."""
