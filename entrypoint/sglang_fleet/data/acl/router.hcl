# ACL policy of a sglang-fleet router agent (docs/security.md).
#   ${cluster}      FLEET_CLUSTER (unused here: the router filters services by their cluster tag)
#   ${consul_node}  unused here
# Render and create it with:
#   sglang-fleet acl-policy router > router.hcl
#   consul acl policy create -name sglang-fleet-router -rules @router.hcl
#   consul acl token create -policy-name sglang-fleet-router

# The serving groups it routes to, and their health.
service "sglang" {
  policy = "read"
}
# Health answers list only the nodes a token may read.
node_prefix "" {
  policy = "read"
}
# Its own registration.
service "sglang-router" {
  policy = "write"
}
