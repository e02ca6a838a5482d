"""Old import path of ``cabin_monitor.vision.emotion``, kept until ``training/`` imports the new one.

A package rather than ``emotion.py``: with a file at the old path git would no longer see the move to
``vision/emotion.py``, and edits made to ``emotion.py`` on other branches would not follow it there.
"""

from cabin_monitor.vision.emotion import EmotionModel

__all__ = ["EmotionModel"]
