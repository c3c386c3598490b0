"""One rendezvous member in its own process, for the etcd-auth tests: registers as node
argv[1] with the etcd credentials of HORDE_ETCD_USER / HORDE_ETCD_PASSWORD_FILE, prints
`leader <node>` whenever it becomes the leader, and runs until killed."""

from __future__ import annotations

import logging
import os
import sys
import time

from rendezvous import backend_from_url
from rendezvous.agent import NodeAgent
from rendezvous.generation import NodeInfo
from rendezvous.settings import RendezvousSettings


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    node_id = sys.argv[1]
    settings = RendezvousSettings(job=os.environ["TEST_JOB"], lease_ttl=2, min_np=1,
                                  max_np=4, target_np=1)
    backend = backend_from_url(os.environ["TEST_ETCD"], timeout=2.0)
    info = NodeInfo(node_id=node_id, host=f"host-{node_id}", addr="127.0.0.1",
                    store_port=29500, pid=os.getpid())
    agent = NodeAgent(backend, settings, info)
    agent.start()
    led = False
    while True:
        if agent.is_leader and not led:
            print(f"leader {node_id}", flush=True)
        led = agent.is_leader
        if agent.error is not None:
            print(f"error {agent.error!r}", flush=True)
            raise SystemExit(1)
        time.sleep(0.05)


if __name__ == "__main__":
    main()
