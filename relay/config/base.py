"""What every section of the configuration shares: unknown keys are errors, values are
frozen once validated, and the shape of a name (a tenant's slug, a sink's name)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

SLUG_RE = r"^[a-z0-9][a-z0-9_-]{0,62}$"
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP field name (RFC 9110)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
