"""The same instance sent many times at once, over REST and DIMSE together, to a whole gateway
(real sockets, real clients) with its Triton edge faked: every sender is answered with success
and one result is stored for the instance."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from pynetdicom import AE
from pynetdicom.presentation import StoragePresentationContexts

from services.gateway.phi import uid_hash
from tests.gateway.harness import base_url, fake_gateway, wait_for
from tests.gateway.util import dicom_bytes, make_instance

REST_SENDERS, DIMSE_SENDERS = 35, 15


def test_fifty_identical_instances_at_once_over_rest_and_dimse_with_fake_triton(
        tmp_path: Path) -> None:
    # All DIMSE senders share one calling AE title: allow it every one of them at once.
    gw = fake_gateway(tmp_path, max_associations=DIMSE_SENDERS + 2,
                      max_associations_per_ae=DIMSE_SENDERS)
    ds = make_instance(7)
    data = dicom_bytes(ds)
    start = threading.Barrier(REST_SENDERS + DIMSE_SENDERS, timeout=30)

    def rest() -> int:
        with httpx.Client(base_url=base_url(gw), timeout=60) as client:
            start.wait()
            try:
                return client.post("/v1/infer", content=data,
                                   headers={"Content-Type": "application/dicom"}).status_code
            except httpx.HTTPError:  # a connection dropped without an answer
                return -1

    def dimse() -> int:
        ae = AE(ae_title="SAMESCU")
        ae.requested_contexts = StoragePresentationContexts[:100]
        assoc = ae.associate("127.0.0.1", gw.config.dicom_port, ae_title=gw.config.ae_title)
        assert assoc.is_established
        try:
            start.wait()
            rsp = assoc.send_c_store(ds)
            return int(rsp.Status) if "Status" in rsp else -1
        finally:
            assoc.release()

    try:
        with ThreadPoolExecutor(REST_SENDERS + DIMSE_SENDERS) as pool:
            rest_f = [pool.submit(rest) for _ in range(REST_SENDERS)]
            dimse_f = [pool.submit(dimse) for _ in range(DIMSE_SENDERS)]
            rest_codes = [f.result() for f in rest_f]
            dimse_codes = [f.result() for f in dimse_f]
        assert rest_codes == [200] * REST_SENDERS
        assert dimse_codes == [0x0000] * DIMSE_SENDERS
        results = gw.results.root / uid_hash(ds.StudyInstanceUID)
        assert wait_for(lambda: not gw.spool.pending(), timeout=60)
        assert [p.name for p in results.iterdir()] == [f"{uid_hash(ds.SOPInstanceUID)}.json"]
        [stored] = gw.results.for_study(ds.StudyInstanceUID)
        assert stored["sop_instance_uid"] == ds.SOPInstanceUID
        assert not list(gw.spool.failed.iterdir())
    finally:
        gw.stop()
