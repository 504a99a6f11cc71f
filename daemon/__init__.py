"""magdr-guard daemon: the MagDR Guard as a video service (DESIGN §1, §6, §8)."""

from __future__ import annotations

__version__ = "0.1.0"
