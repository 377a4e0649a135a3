"""What differs per kind of head: targets, loss and decisions (single-label, multi-label)."""
