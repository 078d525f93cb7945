# The guide's DeepSeek-R1 prefill/decode disaggregation: a 2-host prefill group, a 2-host decode group
# and the router (smg in PD mode).
#   nomad job run -var-file compose/nomad/deepseek-r1-pd.vars.hcl compose/nomad/sglang-fleet.nomad.hcl
cluster     = "deepseek-r1"
router_mode = "pd"
groups = [
  { name = "r1-prefill-a", preset = "deepseek-r1-prefill", nnodes = 2 },
  { name = "r1-decode-a", preset = "deepseek-r1-decode", nnodes = 2 },
]
