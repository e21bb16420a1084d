"""pacsvault vs Orthanc, side by side in one run: ``python -m bench compare``."""
