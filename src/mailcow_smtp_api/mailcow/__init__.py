"""mailcow's side: its database (read only), password checks, the read cache, and its Redis."""
