# ACL policy for `sglang-fleet status` (read-only; docs/security.md).
#   ${cluster}      FLEET_CLUSTER to show
#   ${consul_node}  unused here
key_prefix "sglang-fleet/${cluster}/" {
  policy = "read"
}
service_prefix "" {
  policy = "read"
}
node_prefix "" {
  policy = "read"
}
