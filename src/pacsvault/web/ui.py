"""Sign-in, second factor, sessions and account pages. Being built."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
