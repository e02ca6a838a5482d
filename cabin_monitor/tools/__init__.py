"""Commands beside the daemon: ``bench``, ``analyze``, ``evaluate``, and ``annotate`` (the demo video)."""
