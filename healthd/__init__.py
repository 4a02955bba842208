"""healthd: a training-health service for deep-learning jobs.

This package is the server side. Importing it does nothing: build an app with
``healthd.server.app.create_app(settings)`` or run ``healthd serve``.
"""

__version__ = "0.1.0"
