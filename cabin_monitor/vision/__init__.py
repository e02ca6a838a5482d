"""From camera frames to emotion readings, one stage per module; no threads (``runtime/`` runs them).

``capture`` (frames from a camera, file or stream), ``detect`` (faces), ``track`` (occupants and seats),
``framing`` (the canonical face framing shared with training), ``align`` (canonical crops), ``emotion``
(EmotionalDAN on onnxruntime) and ``reader`` (faces to readings, for the daemon and the tools alike).
"""
