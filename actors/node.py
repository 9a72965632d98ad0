"""Where an actor runs, as other parties see it."""

import ray


def node_endpoint() -> str:
    """This node's address and its Ray cluster's GCS port: where a peer joins to reach actors here."""
    gcs_port = ray.get_runtime_context().gcs_address.rpartition(":")[2]
    return f"{ray.util.get_node_ip_address()}:{gcs_port}"
