"""The label convention shared by masks, losses, metrics and tasks.

``labels`` hold, per token, the token id where it is trained and :data:`IGNORE_INDEX` (-100,
as in PyTorch and transformers) where it is not. They are not shifted: the shift that makes
position t predict token t + 1 happens in the loss.
"""

from __future__ import annotations

IGNORE_INDEX = -100  # the label of a token (or item) that is not trained
