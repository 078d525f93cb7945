# ACL policy of a sglang-fleet node (docs/security.md). Least privilege for one cluster:
#   ${cluster}      FLEET_CLUSTER of the nodes this token is for
#   ${consul_node}  the node name of the Consul agent those nodes talk to (sessions are created on it)
# Render and create it with:
#   sglang-fleet acl-policy node --consul-node gpu-host-07 > node-gpu-host-07.hcl
#   consul acl policy create -name sglang-fleet-node-gpu-host-07 -rules @node-gpu-host-07.hcl
#   consul acl token create -policy-name sglang-fleet-node-gpu-host-07

# Rendezvous keys (gen, ranks, leader, barrier, drain), FATAL records: the cluster's prefix only.
key_prefix "sglang-fleet/${cluster}/" {
  policy = "write"
}
# The heartbeat service whose TTL check every session is bound to.
service "sglang-fleet-member" {
  policy = "write"
}
# The serving registration (rank 0 of a group registers it; any node may become rank 0).
service "sglang" {
  policy = "write"
}
# Rank keys are held by a session on this node's Consul agent.
session "${consul_node}" {
  policy = "write"
}
