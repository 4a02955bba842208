"""Holds only ``sitecustomize.py``: ``healthd-run`` puts this directory on PYTHONPATH (``healthd_client.launcher``)."""
