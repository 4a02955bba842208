"""Thin adapters for training frameworks (DDP, Ray Train, Lightning, transformers, DeepSpeed).

Each adapter only calls ``healthd_client.attach`` and ``Monitor.step``/``eval``
at the framework's hook points, or (DDP, DeepSpeed) supplies the quantities that
read what the framework keeps; ``attach`` picks DeepSpeed's when given a ZeRO engine.
"""
