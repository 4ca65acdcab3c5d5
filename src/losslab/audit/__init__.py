"""``losslab audit``: check a fine-tuning setup's loss masks, normalisation and loss scale."""
