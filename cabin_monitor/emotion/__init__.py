"""Old import path of ``cabin_monitor.vision.emotion``, kept until ``training/`` imports the new one.

A package rather than ``emotion.py``: with a file at the old path git would no longer see the move to
``vision/emotion.py``, and edits made to ``emotion.py`` on other branches would not follow it there. Every
public name is re-exported, so that names added to the module there are found here too.
"""

from cabin_monitor.vision.emotion import *  # noqa: F403
