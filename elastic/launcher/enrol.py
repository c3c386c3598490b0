"""Enrolment of a `horderun --join` worker: its coordinator token and its own etcd user.

A job whose etcd runs with authentication (the default of the embedded etcd) admits a
joining node only with credentials of its own. The joining launcher registers each worker
with the job's coordinator and asks it for the node's etcd user, as the volunteer client
does, before the worker starts.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from dataclasses import dataclass

import requests

from elastic.coordinator_client import (
    RETRY_STATUS,
    CoordinatorClient,
    CredentialsRefused,
    etcd_ca_from_answer,
    etcd_credentials_from_answer,
)
from rendezvous.errors import RendezvousError
from rendezvous.etcd_auth import EtcdCredentials

logger = logging.getLogger(__name__)


class EnrolmentError(RendezvousError):
    """The coordinator did not register a joining node or issue its etcd user."""


@dataclass(frozen=True)
class Enrolment:
    """What a joining worker needs: its coordinator token and, where etcd runs with
    authentication, its own etcd user (None: the job runs without)."""

    node_id: str
    token: str
    etcd: EtcdCredentials | None
    #: the CA (PEM) the coordinator verifies an https etcd with, unchecked: see `pinned_ca`
    etcd_ca: str | None = None


def enrol(coordinator: str, node_id: str, registration_token: str | None = None,
          deadline_s: float = 30.0) -> Enrolment:
    """Register `node_id` with the coordinator and fetch its etcd credentials.

    Retries while the coordinator cannot be reached (or answers 5xx/429) for up to
    `deadline_s`; any other refusal is an EnrolmentError that quotes the coordinator.
    """
    client = CoordinatorClient(coordinator)
    token = "hrd_" + secrets.token_urlsafe(32)
    headers = {"Authorization": f"Bearer {registration_token}"} if registration_token else {}
    body = {"node_id": node_id, "display_name": node_id, "token": token,
            "hardware": {"host": socket.gethostname()[:100]}}
    until = time.monotonic() + deadline_s
    try:
        answer = _post(client, "/api/v1/nodes", until, json=body, headers=headers)
        if answer.status_code != 201:
            raise EnrolmentError(
                f"the coordinator at {client.url} refused to register node {node_id} (HTTP "
                f"{answer.status_code}: {answer.text[:300]}); a job that asks for a "
                "registration token takes it from HORDE_COORDINATOR_REGISTRATION_TOKEN")
        answer = _post(client, f"/api/v1/nodes/{node_id}/etcd-credentials", until,
                       headers={"Authorization": f"Bearer {token}"})
        try:
            creds = etcd_credentials_from_answer(answer.status_code, answer.content, node_id)
        except CredentialsRefused as exc:
            raise EnrolmentError(f"{exc}; ask the job's owner, or give this node credentials "
                                 "with HORDE_ETCD_USER / HORDE_ETCD_PASSWORD_FILE") from None
        ca = etcd_ca_from_answer(answer.content) if creds is not None else None
    finally:
        client.close()
    logger.info("node %s registered with %s%s", node_id, coordinator,
                f"; etcd user {creds.user}" if creds else " (the job's etcd has no auth)")
    return Enrolment(node_id, token, creds, ca)


def _post(client: CoordinatorClient, path: str, until: float, **kwargs: object
          ) -> requests.Response:
    delay = 0.2
    while True:
        try:
            answer = client.post(path, timeout=10, **kwargs)  # type: ignore[arg-type]
            if answer.status_code not in RETRY_STATUS or time.monotonic() >= until:
                return answer
            why = f"HTTP {answer.status_code}"
        except requests.RequestException as exc:
            if time.monotonic() >= until:
                raise EnrolmentError(
                    f"cannot reach the job's coordinator at {client.url} ({exc}); it issues "
                    "this node's etcd credentials: check the --coordinator URL of the join "
                    "command") from None
            why = str(exc)
        logger.info("coordinator %s not ready (%s); retrying", client.url, why[:200])
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
