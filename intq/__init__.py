"""intq: an integer-only inference compiler."""
