"""Real and synthetic data that ships offline: scikit-image photos, espeak-ng speech, toy scenes.

Used by tests, benchmarks and ``omni demo``; nothing here downloads.
"""
