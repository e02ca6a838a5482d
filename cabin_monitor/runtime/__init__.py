"""Running the daemon: ``processor`` (one frame through every stage), ``pipeline`` (capture and inference
threads, supervision, shutdown), ``mailbox`` (the latest-frame hand-over) and ``sdnotify`` (systemd).
"""
