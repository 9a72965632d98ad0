"""Where an actor runs, as other parties see it."""

import ray


def node_endpoint() -> str:
    """This node's address and its Ray cluster's GCS port: where a peer joins to reach actors here."""
    gcs_port = ray.get_runtime_context().gcs_address.rpartition(":")[2]
    return f"{ray.util.get_node_ip_address()}:{gcs_port}"


def actor_node(handle) -> tuple[str, str]:
    """(node id, node IP) of the node an actor runs on, from Ray's own records (the actor cannot choose them)."""
    address = ray._private.state.actors(actor_id=handle._actor_id.hex())["Address"]
    return address["NodeID"], address["IPAddress"]
