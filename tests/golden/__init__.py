"""Golden wire vectors: bytes each release wrote, decoded by every later release."""
