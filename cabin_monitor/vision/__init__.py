"""From camera frames to emotion readings, one stage per module; no threads (``runtime/`` runs them).

``capture`` (frames from a camera, file or stream), ``detect`` (faces), ``track`` (occupants and seats),
``framing`` (the canonical face framing shared with training), ``align`` (canonical crops) and ``emotion``
(EmotionalDAN on onnxruntime).
"""
