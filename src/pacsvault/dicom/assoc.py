"""Per-association bookkeeping shared by the listener (``server``) and Q/R (``qr``).

Why a module of its own: ``server`` builds ``qr``'s handlers and ``qr`` needs the state of
the association it answers; both import this instead of each other (no circle), and qr
reaches the state through the public ``ServiceView.state`` instead of a private method.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pacsvault.dicom.policy import Peer
from pacsvault.index.nodes import NodeInfo

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association

    from pacsvault.vault import Vault


@dataclass
class AssocState:
    peer: Peer
    node: NodeInfo | None = None
    outcomes: Counter[str] = field(default_factory=Counter)
    studies: set[str] = field(default_factory=set)
    # C-STORE-RSP statuses of C-GET sub-operations (stores we sent on this association)
    substores: Counter[str] = field(default_factory=Counter)


class ServiceView(Protocol):
    """What Q/R needs of the DICOM service (``server.DicomService`` is one)."""

    @property
    def ae(self) -> AE: ...

    @property
    def vault(self) -> Vault: ...

    def state(self, assoc: Association) -> AssocState: ...
