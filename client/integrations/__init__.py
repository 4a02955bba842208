"""Thin adapters for training frameworks (DDP, Ray Train, Lightning, transformers).

Each adapter only calls ``healthd_client.attach`` and ``Monitor.step``/``eval``
at the framework's hook points; none exists yet.
"""
