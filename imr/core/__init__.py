"""The pure core: address validation and blocking policy. No I/O, no clock of its own."""
