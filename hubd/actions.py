"""The actions the audit trail records, by name. A module of its own so the CLI's parser (`hubd audit --action`)
can offer them without importing the audit log, and pydantic with it."""

from __future__ import annotations

from typing import Literal, get_args

Action = Literal["delete", "evict", "pin", "unpin", "quarantine", "heal", "import"]
ACTIONS: tuple[str, ...] = get_args(Action)
