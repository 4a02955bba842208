"""FrameworkVersions: add a framework's name and version to the AttachReport's ``versions``.

Attach-only (``every_steps=0``): framework integrations pass it through
``attach(extra_quantities=[...])`` so the job's setup records e.g.
``lightning 2.6.6`` next to torch's version ("tracking your work", C. Shao,
"Checklist for debugging neural networks", Towards Data Science, 2019).
"""

from __future__ import annotations

from collections.abc import Mapping

from healthd_client.quantities.base import Quantity, QuantityContext

_MAX_CHARS = 256  # healthd.wire.schema.ShortText


class FrameworkVersions(Quantity):
    name = "framework_versions"

    def __init__(self, versions: Mapping[str, str]) -> None:
        super().__init__(every_steps=0)
        self.versions = {str(k)[:_MAX_CHARS]: str(v)[:_MAX_CHARS] for k, v in versions.items()}

    def on_attach(self, ctx: QuantityContext) -> None:
        ctx.attach_report.setdefault("versions", {}).update(self.versions)
