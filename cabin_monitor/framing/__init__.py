"""Old import path of ``cabin_monitor.vision.framing``, kept until ``training/`` imports the new one.

A package rather than ``framing.py``: with a file at the old path git would no longer see the move to
``vision/framing.py``, and edits made to ``framing.py`` on other branches would not follow it there.
"""

from cabin_monitor.vision.framing import (
    FLIP_68,
    OUTER_EYE_CORNERS,
    TEMPLATE_5,
    apply_affine,
    cv2_matrix,
    five_points_from_68,
    similarity_transform,
)

__all__ = [
    "FLIP_68",
    "OUTER_EYE_CORNERS",
    "TEMPLATE_5",
    "apply_affine",
    "cv2_matrix",
    "five_points_from_68",
    "similarity_transform",
]
