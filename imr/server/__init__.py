"""The imperative shell: socket listener, broker, local addresses, daemon life cycle."""
