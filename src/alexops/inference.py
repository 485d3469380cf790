"""Moved to `alexops.serving.model` (and image decoding to `alexops.images`).

Kept as a re-export for code written before the serving subpackage (the quantize stage);
new code imports `alexops.serving.model`.
"""

from alexops.serving.model import LoadedModel, load_model, session_options

__all__ = ["LoadedModel", "load_model", "session_options"]
