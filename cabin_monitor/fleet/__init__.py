"""The fleet side: what an operator runs for many vehicles (the ``fleet`` extra; the daemon never imports it)."""
