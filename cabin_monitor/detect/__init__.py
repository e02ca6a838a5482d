"""Old import path of ``cabin_monitor.vision.detect``, kept until ``training/`` imports the new one.

A package rather than ``detect.py``: with a file at the old path git would no longer see the move to
``vision/detect.py``, and edits made to ``detect.py`` on other branches would not follow it there.
"""

from cabin_monitor.vision.detect import create_detector

__all__ = ["create_detector"]
