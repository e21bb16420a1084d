"""Every change pacsvault makes to pynetdicom and pydicom, and every upstream function our
code copies or leans on, in one place.

Why one module: these depend on library internals (module globals, private attributes,
method bodies copied to be changed) that a minor release may change without a word. They
were written for the pinned versions (pyproject.toml: pynetdicom 3.0.x, pydicom 3.0.x):
``check_versions`` refuses any other, and ``tests/test_library_patches.py`` compares the
source of every upstream function in ``UPSTREAM`` with the SHA-256 recorded here, so an
upgrade fails loudly, naming what to re-read (then update the hash).

Applied here, at the moment each was applied before this module existed:

- ``configure_pynetdicom``: pynetdicom's configuration globals (at import of
  ``dicom/server``, as the module-level assignments did, and before ``dicom/send`` and
  ``dicom/echo`` make their AE), ``safe_reactor_pause``: ``Association._run_reactor``
  replaced by a copy whose pause a sending thread can rely on, and ``safe_request_answer``:
  ``ACSE._negotiate_as_requestor`` replaced by a copy that reads a peer's quick answer;
- ``wrap_service_encode``: the ``encode`` pynetdicom's service classes call, so C-FIND
  answers are encoded from DICOM JSON (``answers.install``, when Q/R is created);
- ``wrap_store_encode``: the ``encode`` ``Association.send_c_store`` calls, so a
  retrieved object leaves as stored (``retrieve.install``, when Q/R is created);
- ``wrap_send_c_store``: ``Association.send_c_store``, so a retrieved object leaves as one
  pre-encoded message written in batches (``retrieve.install``, with the one above);
- ``wrap_send_msg``: ``DIMSEServiceProvider.send_msg``, so the C-GET/C-MOVE responses sent
  after each sub-operation are encoded directly (``retrieve.install`` too), and the C-FIND
  responses (``findwire.install``, when Q/R is created);
- ``wrap_associate``: one AE's ``associate``, so a C-MOVE handler learns its
  sub-association (``qr``, when Q/R is created);
- ``register_server``: a listener made with ``AE.make_server`` joins ``AE._servers`` as
  ``AE.start_server`` would, so ``AE.shutdown`` stops it (``server._listen``).

Left where they are, registered in ``UPSTREAM`` (and verified by the test):

- ``dicom/reactor`` and ``dicom/assocreactor``: copies of pynetdicom's two polling loops
  and its PDU reader, in subclasses swapped in per association by ``accelerate`` (300
  lines of loop code that belong with the resource budget they enforce; nothing global is
  changed), and with ``dicom/storewire`` the direct C-STORE receive path, which does for
  a plain C-STORE request what DT-2, the DIMSE provider, ``_serve_request`` and the
  Storage SCP do;
- ``dicom/listener``: ``ContextList``/``copy_context`` (pynetdicom deep-copies the
  server's contexts for each association; ours are shared, and ``restrict_contexts`` copies
  the few requested before shaping them), ``PolicyACSE``, ``PolicyRequestHandler``;
- ``dicom/uidcheck``: ``set_uid`` (rebound where pynetdicom imported it) and
  ``PresentationContext.add_transfer_syntax`` skip their checks for registered UIDs
  (installed by ``dicom/server`` with the configuration);
- ``dicom/findwire``: C-FIND responses written directly (through ``wrap_send_msg``);
  ``dicom/part10``: ``file_meta`` (pynetdicom's ``encode_file_meta``, byte for byte);
- ``dicomfile/parse``: pydicom's ``reading_validation_mode`` set to IGNORE at its import
  (a public setting; the bottom DICOM-file layer must not import this network-side
  module). ``pydicom_settings_applied`` lets the test verify it;
- ``dicomfile/inflate``: pydicom's private ``_read_file_meta_info`` and the deflate path of
  ``read_partial``; ``dicom/answers``: ``write_data_element``'s encoding, byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pydicom
import pynetdicom
from pydicom import config as pydicom_config
from pynetdicom import _config

# Versions the patches were written and checked for (a prefix of ``__version__``).
WRITTEN_FOR = {"pynetdicom": "3.0.", "pydicom": "3.0."}

# Upstream code each patch copies, wraps or relies on: dotted name -> SHA-256 of its
# ``inspect.getsource`` at pynetdicom 3.0.4 / pydicom 3.0.2. A property is hashed by its
# getter. When the test reports a difference: read the upstream change, port it to the
# pacsvault code named in the comment, then record the new hash.
UPSTREAM: dict[str, str] = {
    # assocreactor.FastAssociation._run_reactor and patches._run_reactor: copies; .run wraps it
    "pynetdicom.association.Association._run_reactor":
        "f28838c5559e462a563750cfc9f3790027f4bb7e2223baf42c9f5d682c359dee",
    # patches._negotiate_as_requestor: a copy
    "pynetdicom.acse.ACSE._negotiate_as_requestor":
        "507959152c5896c634fad04f075f213f281840809017c48844f401c66c410a92",
    "pynetdicom.association.Association.run":
        "a161d0cc851c01c404d61fa420cb0e0b2ef6fab260623b65ead501c110eed311",
    # reactor.accelerate rebinds the thread target made here
    "pynetdicom.dul.DULServiceProvider.__init__":
        "c82dafa9438ddf70685917cb15d2bfbc814aa0ad5233ffb0ae650faedc7570f0",
    # reactor.WakeableDUL: copies of run_reactor and _read_pdu_data, send_pdu wrapped
    "pynetdicom.dul.DULServiceProvider.run_reactor":
        "e3a10eb3a0931e4854af33b9496e92d9679522aca26b0e04da8967559b9e2803",
    "pynetdicom.dul.DULServiceProvider._read_pdu_data":
        "19f2d4e38c13c83586365d93dd5cd96a0c7c665cb37251054b3e1f246e9f431b",
    "pynetdicom.dul.DULServiceProvider.send_pdu":
        "7cbce5da8594124e9e70c790a68df640d21df11af4220783e752bc607de8dde6",
    # (assoc)reactor (issue 17, no idle ticks): kill and kill_dul wrapped, stop_dul a copy
    "pynetdicom.association.Association.kill":
        "8f9713666a7f4cffd840899f023090e9786668945a7c844f99d7a834077c3972",
    "pynetdicom.dul.DULServiceProvider.kill_dul":
        "5ceccf8dd01c2072c377d18bb1be284941a345bd40f03bd1e03a864ab0817842",
    "pynetdicom.dul.DULServiceProvider.stop_dul":
        "28a7e0be126e7b306369cc1b131daec8e907d21d0f5692930133b6599b8c6e5f",
    # (assoc)reactor + storewire (issue 17): the direct C-STORE receive path does what these do
    # for a plain C-STORE request (PDVs -> message, dispatch, handler, response encoding)
    "pynetdicom.fsm.DT_2":
        "9ec543394e0b49eb8be2448fc3f9950361b0047db7cf3742844f377bd225ba73",
    "pynetdicom.dimse.DIMSEServiceProvider.receive_primitive":
        "5f99c86b14a15cefa87d914cda3591ec4d636d4c53a982e945ec9c1828c6e43f",
    "pynetdicom.dimse_messages.DIMSEMessage.decode_msg":
        "f51c777e841a76beeaadfe3015bd4f4a68387229a72f13f3a3b7846d01d72284",
    "pynetdicom.dimse_messages.DIMSEMessage.encode_msg":
        "73000c902c52832dab302ddb3bc274ea93d205a810a197225dd87d4c1212ba57",
    "pynetdicom.association.Association._serve_request":
        "2f24c1759cdf6c8c433094f2a8dd8144f76f5547f03daed7b94e0f78bc12f877",
    "pynetdicom.service_class.StorageServiceClass.SCP":
        "63afca7fc6c6e7ee6e6eb303dd6aa72c1e69dbfcb94dd91c9e90ea6d900a4c40",
    # reactor.BulkSocket.recv replaces it
    "pynetdicom.transport.AssociationSocket.recv":
        "6bc20a33b1b7cfe76d4ad4407ca242563bc6206fde4b4e1cf7a2fbb1f11d621d",
    # listener.PolicyRequestHandler; its deepcopy of the contexts -> listener.ContextList
    "pynetdicom.transport.RequestHandler._create_association":
        "05c8d12b79863cdbdb901ce37187b7030a0434c5cd89d219ed0bedbda679a61e",
    "pynetdicom.transport.RequestHandler.handle":
        "034823fb4df3a87467bd0d45193f0d457fcf59c87fda8e97b2edfb89426f76dd",
    # listener.PolicyACSE
    "pynetdicom.acse.ACSE._negotiate_as_acceptor":
        "fffd360957c42a8ed89284cf1b1b734527c9be60253950777a0330c0f2be692e",
    # listener.copy_context: the private list behind this property
    "pynetdicom.presentation.PresentationContext.transfer_syntax":
        "469b45a2f34fd9f5fc253354d325714e77e67f878f0c0b8c913fba7ee21035a0",
    # register_server: AE._servers as start_server fills it and shutdown empties it
    "pynetdicom.ae.ApplicationEntity.start_server":
        "d3868a2df83d3cc08966b575dd8663ee18f101b03ec8d2766639c621b2d58841",
    "pynetdicom.ae.ApplicationEntity.make_server":
        "6569298ac5cf837c040e6e5bcf3761f69f3792b21b15085f34ebbafcc29b9904",
    "pynetdicom.ae.ApplicationEntity.shutdown":
        "3084723b79cf471ee5866c61327fc3a7af8f3976791a3c946baec4b15f5c6d49",
    # wrap_service_encode: the wrapped function, and the C-FIND SCP that calls it
    "pynetdicom.dsutils.encode":
        "0d29ffd5d358c45a6b20436a9a45ec4ea003631dd4323e827c87365624c71cf0",
    "pynetdicom.service_class.ServiceClass._c_find_scp":
        "da242b908ef4848ceaec8937680dfe9d23705301f6bad99de6dd64786cd9a7ca",
    # wrap_store_encode: send_c_store calls the wrapped encode once, after picking the
    # exact (SOP class, syntax) context; the C-GET SCP hands it the yielded dataset
    "pynetdicom.association.Association.send_c_store":
        "fa5a8127f349f8e75698f4cdf2b4dbe3f38e3e9e320a8cf45c15bf8333f9c283",
    "pynetdicom.service_class.QueryRetrieveServiceClass._get_scp":
        "8ca1538e3e56c4f7317f3d8bd0d0e009d596e9f3c57027db3128ec7e728e46a6",
    "pynetdicom.association.Association._get_valid_context":
        "117a52c2ae6720e0bc934266b1ef0aede4366c3de895b16f0c773c3a5076442d",
    # wrap_send_c_store + dicom/sendpath (issue 17): a retrieve.Raw's C-STORE-RQ is sent as
    # one pre-encoded message (command encoded, PDUs cut as encode_msg/_generate_pdv_fragments
    # cut them), written by the DUL thread where DT-1/AR-7 would send it, as these do
    "pynetdicom.dimse_messages.DIMSEMessage._generate_pdv_fragments":
        "00803668b90f2a3fd570e63510915de70c4c0310728f04eac97a0128cf2206f7",
    "pynetdicom.dimse.DIMSEServiceProvider.send_msg":
        "a839cf2fb46976d9da29cf06fea41c04416b38d14fab612af12e5d869bd5b3f0",
    # wrap_send_msg: the C-GET/C-MOVE responses encoded as these build and encode them
    "pynetdicom.dimse_messages.DIMSEMessage.primitive_to_message":
        "71fd61d5997f0f0c38abc2d383c4c6457f9c770468288aab04eb82a04d00ce00",
    "pynetdicom.dul.DULServiceProvider._process_recv_primitive":
        "4c0ebbb3e646e35e8e5bbc27ee2f1e6b2c82bbf619232f47639a6cbae092ed39",
    "pynetdicom.dul.DULServiceProvider._send":
        "a850a7919e68484ef6751ee7a199b3ba4a911b5cbf0c2928bf796c55539254d4",
    "pynetdicom.fsm.DT_1":
        "82e5c5d4114534fa9ac86124c7c7ef11ff2b98bc73069372cbe413af9df19081",
    "pynetdicom.fsm.AR_7":
        "9a8d68182bf5c9fd0762295535a20ef3b1f04d83f22d47dcd55a063dbf806d40",
    "pynetdicom.transport.AssociationSocket.send":
        "1ea8158c0b51facac667a0340b93f495b947fdc4f55663946fb30d456c804e09",
    # wrap_associate: the C-MOVE SCP passes the handler's kwargs to AE.associate
    "pynetdicom.service_class.QueryRetrieveServiceClass._move_scp":
        "5c14d1be3d737befcc148893bcd529a03695e82f8f943f19b640ff4f32382742",
    # uidcheck (issue 17): registered UIDs skip the checks these make, whose outcome is
    # known for them (conformant: passes the validator in both modes, no warning)
    "pynetdicom.utils.set_uid":
        "f917a8035170f79262606ce81ff903350ae59d272c75d6d15684d9dcde3d178b",
    "pynetdicom.presentation.PresentationContext.add_transfer_syntax":
        "83bb818ef65a69687f8a1d7568ff70b7c82d8e6b3173ad68aa1a26dca0385585",
    "pynetdicom._validators.validate_ui":
        "3a4aa36750c3c8a5fdd320cd827090d52fe696ef3215eac1958bb28b2ac7c70e",
    "pynetdicom.utils.validate_uid":
        "143fcbdb33a4a54e76b194622e143026a0d467f9c518a0716e646d6bf29ee137",
    # findwire (issue 17) writes C-FIND responses as send_msg + primitive_to_message +
    # encode_msg (above) would, after _c_find_scp (above) built them; server.restrict_contexts
    # leaves out the contexts not asked for, as this only looks up the asked ones
    "pynetdicom.presentation.negotiate_as_acceptor":
        "d5413f08f0ac7b32b2b95f629d88242be5785d4a37888a14c265e0c27452da05",
    # part10.file_meta writes what this writes
    "pynetdicom.dsutils.encode_file_meta":
        "9c08a44b26b58301a092a9641c35b8c6f471eab40bedca1dea31cf19e9169e7c",
    # dicomfile/inflate: the private meta reader it calls, and the deflate path it replaces
    "pydicom.filereader._read_file_meta_info":
        "3bab7b6e04e1c02e2b080bad3addd9e60ee8d4c4bc8e6644a93508549466d98b",
    "pydicom.filereader.read_partial":
        "82154731a8e25edc94b538ed9ed8c0a852d08acb2dbd5c4f4b937790858d41be",
    # answers.encode_answer: byte for byte what this writes
    "pydicom.filewriter.write_data_element":
        "f65286b7574621a1cdb692473d7e61eeac902839cf40c184d6d6ca77c8b218b7",
}

# pynetdicom configuration globals set by ``configure_pynetdicom``.
PYNETDICOM_CONFIG: dict[str, object] = {
    # Received datasets stay in memory: pynetdicom's chunked mode would spool them, in
    # clear, to a temporary file.
    "STORE_RECV_CHUNKED_DATASET": False,
    # Query identifiers (names, IDs) must not reach its log either.
    "LOG_REQUEST_IDENTIFIERS": False,
    "LOG_RESPONSE_IDENTIFIERS": False,
    # No standard event handlers (issue 17): they only log at INFO/DEBUG, which the
    # "pynetdicom" logger drops (cli/common keeps it to warnings), yet they formatted every
    # association request (each proposed context) and every DIMSE message and PDU anyway.
    # pynetdicom's warnings and errors are unaffected.
    "LOG_HANDLER_LEVEL": "none",
}


class UnsupportedLibraryVersion(RuntimeError):
    """pynetdicom or pydicom is not a version the patches were written for."""


def check_versions() -> None:
    """Refuse to patch a library version the patches were not written for."""
    found = {"pynetdicom": str(pynetdicom.__version__), "pydicom": str(pydicom.__version__)}
    wrong = [f"{name} {found[name]} (written for {prefix}x)"
             for name, prefix in WRITTEN_FOR.items() if not found[name].startswith(prefix)]
    if wrong:
        raise UnsupportedLibraryVersion(
            "pacsvault's library patches (pacsvault/dicom/patches.py) do not support "
            + ", ".join(wrong) + ": install the versions pinned in pyproject.toml")


def configure_pynetdicom() -> None:
    """pynetdicom's configuration globals, its association loop's pause made safe
    (``safe_reactor_pause``) and a quick answer to an association request read
    (``safe_request_answer``) (idempotent)."""
    check_versions()
    for name, value in PYNETDICOM_CONFIG.items():
        if not hasattr(_config, name):
            raise UnsupportedLibraryVersion(f"pynetdicom._config.{name} no longer exists")
        setattr(_config, name, value)
    safe_reactor_pause()
    safe_request_answer()


def reactor_paused_by_sender(assoc: Any) -> bool:
    """Called by an association loop right after it passed ``_reactor_checkpoint`` and
    cleared ``_is_paused``: True when a sender cleared the checkpoint meanwhile, so the loop
    must not take a message off the DIMSE queue now (it goes round and pauses).

    Why: a thread that sends on an association and waits for the answer
    (``Association.send_c_store``, a C-MOVE's sub-operations) clears the checkpoint and
    waits until ``_is_paused`` is True. The loop sets that flag *before* waiting on the
    checkpoint, so a sender may see it still True from a loop that has just passed the
    checkpoint, send, and have its own C-STORE-RSP taken by that loop ("Received
    unexpected C-STORE service message", then the DIMSE timeout: a failed sub-operation;
    seen under load in CI)."""
    return not assoc._reactor_checkpoint.is_set()


def safe_reactor_pause() -> None:
    """``Association._run_reactor`` (requestor associations: a C-MOVE's sub-association,
    sends, echoes) replaced by a copy that checks ``reactor_paused_by_sender`` after the
    checkpoint; acceptors run ``assocreactor.FastAssociation._run_reactor``, which does the
    same. Idempotent."""
    check_versions()
    from pynetdicom.association import Association

    if getattr(Association._run_reactor, "pv_safe_pause", False):
        return
    _run_reactor.pv_safe_pause = True  # type: ignore[attr-defined]
    _run_reactor.__wrapped__ = Association._run_reactor  # type: ignore[attr-defined]
    setattr(Association, "_run_reactor", _run_reactor)  # noqa: B010


def _run_reactor(self: Any) -> None:  # pynetdicom 3.0.4 Association._run_reactor
    import time

    from pynetdicom import evt
    from pynetdicom.association import LOGGER

    self._is_paused = False
    while not self._kill:
        if self._reactor_checkpoint.is_set():
            # pynetdicom's 1 ms period, spent *paused*: a sender (``send_c_store``: each
            # sub-operation of a C-MOVE) that clears the checkpoint goes on at once instead
            # of polling ``_is_paused`` until this sleep ends (issue 17: up to 1 ms per
            # sub-operation). Safe: nothing is taken off the DIMSE queue before the
            # checkpoint below and ``reactor_paused_by_sender`` are passed.
            self._is_paused = True
            time.sleep(0.001)
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False
        if reactor_paused_by_sender(self):  # (the one change: see that function)
            continue

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, int(context_id))

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


def answered_before_checked(dul: Any) -> bool:
    """Called by a requestor that finds its transport not connected after the connection
    attempt: True when the peer's answer (an A-ASSOCIATE accept or reject) is already
    queued for it, i.e. the transport was connected, the answer came and the connection was
    closed (AE-4 closes it on a rejection) before this thread looked.

    Why: pynetdicom's requestor sends its request, then (in the calling thread) waits for
    the connection attempt and takes "not connected" as "could not connect": it aborts. A
    peer that rejects at once (pacsvault refusing an unknown AE title) can answer, and the
    DUL thread close the connection, before the calling thread is scheduled again: the
    rejection was then reported as an abort with no answer (a flaky
    ``test_server_and_cli_append_concurrently`` in CI; ``dicom send`` and ``echo`` would say
    "connection failed" instead of "rejected" to a user). A failed connection queues an
    A-P-ABORT instead (AA-4), so it is still an abort."""
    from pynetdicom.pdu_primitives import A_ASSOCIATE

    return isinstance(dul.peek_next_pdu(), A_ASSOCIATE)


def safe_request_answer() -> None:
    """``ACSE._negotiate_as_requestor`` replaced by a copy that reads a quick answer
    (``answered_before_checked``). Idempotent."""
    check_versions()
    from pynetdicom.acse import ACSE

    if getattr(ACSE._negotiate_as_requestor, "pv_quick_answer", False):
        return
    _negotiate_as_requestor.pv_quick_answer = True  # type: ignore[attr-defined]
    _negotiate_as_requestor.__wrapped__ = (  # type: ignore[attr-defined]
        ACSE._negotiate_as_requestor)
    setattr(ACSE, "_negotiate_as_requestor", _negotiate_as_requestor)  # noqa: B010


def _negotiate_as_requestor(self: Any) -> None:  # pynetdicom 3.0.4
    from pynetdicom import evt
    from pynetdicom.acse import LOGGER
    from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
    from pynetdicom.presentation import negotiate_as_requestor

    if not self.requestor.requested_contexts:
        LOGGER.error(
            "One or more requested presentation contexts must be set "
            "prior to association negotiation"
        )
        self.assoc.kill()
        return

    self.send_request()
    evt.trigger(self.assoc, evt.EVT_REQUESTED, {})

    socket = self.socket
    socket._ready.wait()

    # (the one change: see answered_before_checked)
    if not socket._is_connected and not answered_before_checked(self.dul):
        self.assoc.abort()
        return

    rsp = self.dul.receive_pdu(wait=True, timeout=self.acse_timeout)

    if isinstance(rsp, A_ASSOCIATE):
        self.acceptor.primitive = rsp
        if rsp.result == 0x00:
            rq_roles = {
                uid: (ii.scu_role, ii.scp_role)
                for uid, ii in self.requestor.role_selection.items()
            }
            if rq_roles:
                for cx in self.requestor.requested_contexts:
                    try:
                        (cx.scu_role, cx.scp_role) = rq_roles[cx.abstract_syntax]
                        cx.scu_role = cx.scu_role or False
                        cx.scp_role = cx.scp_role or False
                    except KeyError:
                        pass

            ac_roles = {
                uid: (ii.scu_role, ii.scp_role)
                for uid, ii in self.acceptor.role_selection.items()
            }
            negotiated_contexts = negotiate_as_requestor(
                self.requestor.requested_contexts,
                rsp.presentation_context_definition_results_list,
                ac_roles,
            )
            self.assoc._accepted_cx = {
                cx.context_id: cx for cx in negotiated_contexts if cx.result == 0x00
            }
            self.assoc._rejected_cx = [
                cx for cx in negotiated_contexts if cx.result != 0x00
            ]
            evt.trigger(self.assoc, evt.EVT_ACCEPTED, {})

            if not self.assoc.accepted_contexts:
                LOGGER.error("No accepted presentation contexts")
                self.send_abort(0x02)
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                evt.trigger(self.assoc, evt.EVT_ABORTED, {})
                self.assoc.kill()
            else:
                LOGGER.info("Association Accepted")
                self.assoc.is_established = True
                evt.trigger(self.assoc, evt.EVT_ESTABLISHED, {})

        elif hasattr(rsp, "result") and rsp.result in [0x01, 0x02]:
            LOGGER.error("Association Rejected")
            LOGGER.error(f"Result: {rsp.result_str}, Source: {rsp.source_str}")
            LOGGER.error(f"Reason: {rsp.reason_str}")
            self.assoc.is_rejected = True
            self.assoc.is_established = False
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.dul.kill_dul()
        else:
            LOGGER.error("Received an invalid A-ASSOCIATE response from the peer")
            LOGGER.error("Aborting Association")
            self.send_abort(0x02)
            self.assoc.is_aborted = True
            self.assoc.is_established = False
            evt.trigger(self.assoc, evt.EVT_ABORTED, {})
            self.assoc.kill()

    elif isinstance(rsp, (A_ABORT, A_P_ABORT)):
        LOGGER.error("Association Aborted")
        self.assoc.is_established = False
        self.assoc.is_aborted = True
        evt.trigger(self.assoc, evt.EVT_ABORTED, {})
        self.dul.kill_dul()
    elif rsp is None:
        LOGGER.error(
            "ACSE timeout reached while waiting for response to "
            "association request"
        )
        self.assoc.abort()
    else:
        self.assoc.is_established = False
        self.dul.kill_dul()


def pydicom_settings_applied() -> bool:
    """Whether ``dicomfile/parse`` set pydicom's reading validation as it must (see above)."""
    return bool(pydicom_config.settings.reading_validation_mode == pydicom_config.IGNORE)


# (dataset, is_implicit_vr, is_little_endian, deflated) -> encoded bytes, or the dataset
# for pynetdicom's own ``encode``.
EncodeHook = Callable[[Any, bool, bool, bool], "bytes | Any"]
Encoder = Callable[..., "bytes | None"]


def wrap_service_encode(hook: EncodeHook) -> None:
    """Route the ``encode`` pynetdicom's service classes call through ``hook`` first
    (idempotent: installed once per process)."""
    check_versions()
    from pynetdicom import service_class

    original: Encoder = getattr(service_class, "encode")  # noqa: B009 - not re-exported
    if getattr(original, "pv_answers", False):
        return

    def encode(ds: Any, is_implicit_vr: bool, is_little_endian: bool,
               deflated: bool = False) -> bytes | None:
        out = hook(ds, is_implicit_vr, is_little_endian, deflated)
        if isinstance(out, bytes):
            return out
        return original(out, is_implicit_vr, is_little_endian, deflated)

    encode.pv_answers = True  # type: ignore[attr-defined]
    setattr(service_class, "encode", encode)  # noqa: B010 - not re-exported


# (dataset, is_implicit_vr, is_little_endian, deflated) -> encoded bytes, None (refused:
# the C-STORE fails) or the dataset for pynetdicom's own ``encode``.
StoreEncodeHook = Callable[[Any, bool, bool, bool], "bytes | Any | None"]


def wrap_store_encode(hook: StoreEncodeHook) -> None:
    """Route the ``encode`` that ``Association.send_c_store`` calls through ``hook`` first,
    so a retrieved object leaves as stored (``dicom/retrieve``; idempotent)."""
    check_versions()
    from pynetdicom import association

    original: Encoder = getattr(association, "encode")  # noqa: B009 - not re-exported
    if getattr(original, "pv_raw", False):
        return

    def encode(ds: Any, is_implicit_vr: bool, is_little_endian: bool,
               deflated: bool = False) -> bytes | None:
        out = hook(ds, is_implicit_vr, is_little_endian, deflated)
        if out is None or isinstance(out, bytes):
            return out
        return original(out, is_implicit_vr, is_little_endian, deflated)

    encode.pv_raw = True  # type: ignore[attr-defined]
    setattr(association, "encode", encode)  # noqa: B010 - not re-exported


# (association, dataset, msg_id, priority, originator_aet, originator_id) -> the status
# Dataset, or NotImplemented for pynetdicom's own ``send_c_store``.
SendHook = Callable[[Any, Any, int, int, "str | None", "int | None"], Any]


def wrap_send_c_store(hook: SendHook) -> None:
    """Route ``Association.send_c_store`` through ``hook`` first, so a retrieved object
    leaves as one pre-encoded message (``dicom/sendpath``, issue 17; idempotent). Class
    level: a C-MOVE's sub-association is pynetdicom's own ``Association``."""
    check_versions()
    from pynetdicom.association import Association

    original = Association.send_c_store
    if getattr(original, "pv_send", False):
        return

    def send_c_store(self: Any, dataset: Any, msg_id: int = 1, priority: int = 2,
                     originator_aet: str | None = None,
                     originator_id: int | None = None) -> Any:
        out = hook(self, dataset, msg_id, priority, originator_aet, originator_id)
        if out is NotImplemented:
            return original(self, dataset, msg_id, priority, originator_aet, originator_id)
        return out

    send_c_store.pv_send = True  # type: ignore[attr-defined]
    # inspect.getsource follows __wrapped__: UPSTREAM's hash stays upstream's own source
    send_c_store.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(Association, "send_c_store", send_c_store)  # noqa: B010


# (DIMSE provider, primitive, context ID) -> True when sent, False for pynetdicom's own
MessageHook = Callable[[Any, Any, int], bool]


def wrap_send_msg(hook: MessageHook, *, first: bool = False) -> None:
    """Route ``DIMSEServiceProvider.send_msg`` through ``hook``, so the C-GET/C-MOVE
    responses sent after every sub-operation (``dicom/sendpath``) and the C-FIND
    responses (``dicom/findwire``, ``first``: it must see every message, to write what it
    holds before any other) are encoded directly (issue 17; idempotent per hook). The
    hooks are asked in order; the first that returns True has sent the message."""
    check_versions()
    from pynetdicom.dimse import DIMSEServiceProvider

    hooks: list[MessageHook] | None = getattr(DIMSEServiceProvider.send_msg, "pv_hooks", None)
    if hooks is not None:
        if hook not in hooks:
            hooks.insert(0 if first else len(hooks), hook)
        return
    chain: list[MessageHook] = [hook]
    original = DIMSEServiceProvider.send_msg

    def send_msg(self: Any, primitive: Any, context_id: int) -> None:
        for each in chain:
            if each(self, primitive, context_id):
                return
        original(self, primitive, context_id)

    send_msg.pv_send = True  # type: ignore[attr-defined]
    send_msg.pv_hooks = chain  # type: ignore[attr-defined]
    send_msg.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(DIMSEServiceProvider, "send_msg", send_msg)  # noqa: B010


# (pynetdicom's AE.associate, addr, port, *args, **kwargs) -> the association to use
AroundAssociate = Callable[..., Any]


def wrap_associate(ae: Any, around: AroundAssociate) -> None:
    """One AE's ``associate`` goes through ``around(original, ...)`` (idempotent per AE)."""
    check_versions()
    original = ae.associate
    if getattr(original, "pv_link", False):
        return

    def associate(addr: str, port: int, *args: Any, **kwargs: Any) -> Any:
        return around(original, addr, port, *args, **kwargs)

    associate.pv_link = True  # type: ignore[attr-defined]
    setattr(ae, "associate", associate)  # noqa: B010


def register_server(ae: Any, server: Any) -> None:
    """Registered like ``AE.start_server`` does, so ``AE.shutdown`` stops the server and
    aborts its associations."""
    ae._servers.append(server)


def upstream_object(name: str) -> Any:
    """The function (or property getter) a dotted ``UPSTREAM`` name designates."""
    import importlib
    import inspect

    parts = name.split(".")
    obj: Any = None
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        break
    else:
        raise LookupError(name)
    for part in parts[cut:]:
        obj = inspect.getattr_static(obj, part) if inspect.isclass(obj) else getattr(obj, part)
    if isinstance(obj, property):
        obj = obj.fget
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    return obj


def source_hash(name: str) -> str:
    """SHA-256 of the source of an ``UPSTREAM`` entry as installed now."""
    import hashlib
    import inspect

    return hashlib.sha256(inspect.getsource(upstream_object(name)).encode()).hexdigest()
