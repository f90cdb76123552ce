"""genpipe: batch text-to-image generation with content safety and a per-image audit trail."""

__version__ = "0.1.0"
