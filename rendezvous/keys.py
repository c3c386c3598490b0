"""Where each piece of a job's membership lives in the key space."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JobKeys:
    """Key layout under `/<prefix>/<job>/` (see DESIGN.md, Membership)."""

    prefix: str
    job: str

    @property
    def root(self) -> str:
        return f"/{self.prefix}/{self.job}/"

    @property
    def nodes(self) -> str:
        return self.root + "nodes/"

    def node(self, node_id: str) -> str:
        return self.nodes + node_id

    @property
    def control(self) -> str:
        """Keys every member watches; changes here are rare (one per generation)."""
        return self.root + "control/"

    @property
    def leader(self) -> str:
        return self.control + "leader"

    @property
    def generation(self) -> str:
        return self.control + "generation"

    @property
    def reset(self) -> str:
        """The reset of a generation, announced by the leader (nodes ask under `ready/`)."""
        return self.control + "reset"

    @property
    def status(self) -> str:
        return self.control + "status"

    @property
    def config(self) -> str:
        return self.root + "config"

    @property
    def ready(self) -> str:
        return self.root + "ready/"

    def ready_node(self, node_id: str) -> str:
        """One key per node, holding the generation it is ready after (`ReadyWire`): a
        node's etcd role can grant exactly this key, whatever the generation."""
        return self.ready + node_id

    @property
    def blacklist(self) -> str:
        return self.root + "blacklist/"

    def blacklisted(self, node_id: str) -> str:
        return self.blacklist + node_id

    @property
    def trusted(self) -> str:
        """Marks of the nodes the job owner trusts (written by control identities only):
        the leader ranks them first, so that rank 0, whose state every reset broadcasts,
        is one of them whenever one holds the state."""
        return self.root + "trusted/"

    def trusted_node(self, node_id: str) -> str:
        return self.trusted + node_id

    @property
    def leaving(self) -> str:
        return self.root + "leaving/"

    def leaving_node(self, node_id: str) -> str:
        return self.leaving + node_id

    @property
    def activity(self) -> str:
        """What each node is blocked on (stall inspection), bound to its lease."""
        return self.root + "activity/"

    def activity_node(self, node_id: str) -> str:
        return self.activity + node_id
