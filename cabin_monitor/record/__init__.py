"""Recordings of what the rules engine saw, for offline replay, threshold tuning and timeline reports.

``sink`` is the interface the pipeline records through (no pyarrow needed to import it); ``format``
the entries and their Parquet table; ``policy`` rotation and the folder's size cap; ``files`` reading
recordings back; ``replay`` the rules engine run over them, the summary and the comparison. The
writer thread is ``runtime.recorder``. Needs the ``record`` extra (pyarrow).
"""
