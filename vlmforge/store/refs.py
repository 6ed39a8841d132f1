"""References to builds (``MODEL``, ``MODEL@ALIAS``, ``MODEL#BUILD_ID``) and the ``ANY`` expectation of alias moves."""

from __future__ import annotations

from enum import Enum
from typing import Final

from pydantic import BaseModel, ConfigDict

from vlmforge.artifacts.manifest import check_name
from vlmforge.errors import StoreError
from vlmforge.store.keys import DEFAULT_ALIAS


class _AnyBuild(Enum):
    ANY = "ANY"


ANY: Final = _AnyBuild.ANY
"""``expected=ANY``: move an alias whatever it points to now (still by compare-and-swap, retried)."""


class Ref(BaseModel):
    """A reference to a build: ``MODEL`` (= ``MODEL@latest``), ``MODEL@ALIAS`` or ``MODEL#BUILD_ID``."""

    model_config = ConfigDict(frozen=True)

    model: str
    alias: str | None = None
    build_id: str | None = None

    @classmethod
    def parse(cls, text: str | Ref) -> Ref:
        """Parse a REF string; raise StoreError with the accepted forms if it is malformed."""
        if isinstance(text, Ref):
            return text
        model, alias, build_id = text, None, None
        if "#" in text:
            model, build_id = text.split("#", 1)
        elif "@" in text:
            model, alias = text.split("@", 1)
        try:
            check_name(model, "model name")
            if alias is not None:
                check_name(alias, "alias")
            if build_id is not None:
                check_name(build_id, "build id")
        except ValueError as exc:
            raise StoreError(f"bad reference {text!r}: {exc} (use MODEL, MODEL@ALIAS or MODEL#BUILD_ID)") from None
        return cls(model=model, alias=alias, build_id=build_id)

    @property
    def target_alias(self) -> str | None:
        """The alias this ref resolves through (``latest`` for a bare model), or None for an exact build."""
        return None if self.build_id is not None else (self.alias or DEFAULT_ALIAS)

    def __str__(self) -> str:
        if self.build_id is not None:
            return f"{self.model}#{self.build_id}"
        return f"{self.model}@{self.alias}" if self.alias else self.model
