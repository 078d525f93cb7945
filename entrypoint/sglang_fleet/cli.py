"""`sglang-fleet` command line. Each subcommand lives in the module that owns its concern."""
from __future__ import annotations

import argparse
import sys

from sglang_fleet import __version__, logs
from sglang_fleet.config import EX_CONFIG, ConfigError, load_config


# Commands that take extra launch_server flags after `--` (or, in the image, as the container's arguments).
TAKE_ENGINE_ARGS = ("node", "plan", "config", "doctor")


def _load_or_exit(cluster_only: bool = False, engine_args: list[str] | None = None):
    try:
        return load_config(cluster_only=cluster_only, engine_args=engine_args or ())
    except ConfigError as e:
        # One report, no traceback, nothing started.
        print(e.report(), file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None


def _engine_flags_or_exit(cfg) -> None:
    """SGLang's own parser checks the engine's command line (as rank 0 would run it) before anything starts."""
    from sglang_fleet import sglang_parser
    from sglang_fleet.launch import build_launch
    try:
        launch = build_launch(cfg, cfg.node_rank or 0, cfg.nnodes, f"127.0.0.1:{cfg.dist_port}", "127.0.0.1")
    except ConfigError as e:
        print(e.report(), file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
    verdict = sglang_parser.check_launch(cfg, launch)
    if verdict.error:
        print(ConfigError([verdict.error]).report(), file=sys.stderr)
        raise SystemExit(EX_CONFIG)
    if verdict.note:
        logs.get("sglang-fleet").info(verdict.note)


def _consul_rights_or_exit(cfg, role: str) -> None:
    """Checks the Consul token's rights and the TLS settings before anything starts (access.preflight)."""
    from sglang_fleet import access
    from sglang_fleet import consul_api as ca
    api = ca.ConsulAPI(cfg.consul)
    try:
        access.preflight(api, role, cfg.cluster)
    except ca.ConsulMisconfigured as e:
        print(f"sglang-fleet: {e}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
    finally:
        api.close()


def _split_engine_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """sglang-fleet's own arguments, and the engine's after the first `--` (sim-engine takes all of them)."""
    if "--" not in argv or (argv and argv[0] == "sim-engine"):
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def _settings_epilog(command: str) -> str:
    """The settings `command` reads, by section (generated from the settings table)."""
    from sglang_fleet.settings import SECTIONS, settings_read_by
    rows = settings_read_by(command)
    lines = ["settings it reads (docs/configuration.md; `sglang-fleet config show` prints this host's values "
             "and where each came from):"]
    for section, title in SECTIONS.items():
        names = [s.env for s in rows if s.section == section]
        if names:
            lines.append(f"  {title.split(':')[0].split(' (')[0]}: {', '.join(names)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv, engine_args = _split_engine_args(sys.argv[1:] if argv is None else list(argv))
    parser = argparse.ArgumentParser(prog="sglang-fleet", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sglang-fleet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p_plan = sub.add_parser("plan", help="print the argv and env this node would run (no Consul needed)")
    p_plan.add_argument("--node-rank", type=int, default=None)
    p_plan.add_argument("--dist-init-addr", default=None)
    p_plan.add_argument("--json", action="store_true")
    p_plan.usage = "sglang-fleet plan [-h] [--node-rank N] [--dist-init-addr ADDR] [--json] [-- ENGINE_FLAG ...]"

    sub.add_parser("node", help="run the node supervisor (rendezvous, engine, registration)",
                   usage="sglang-fleet node [-h] [-- ENGINE_FLAG ...]",
                   description="Runs the node supervisor: rendezvous through Consul, the engine, the serving "
                   "registration. Flags after `--` (in the image: the container's arguments) are extra "
                   "`sglang.launch_server` flags, the highest layer over FLEET_SGLANG_ARGS; flags sglang-fleet "
                   "sets itself are refused with the setting to use, and SGLang's own parser checks the command "
                   "line before anything starts.",
                   epilog=_settings_epilog("node"), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_parser("router", help="run smg and keep its workers equal to the healthy services in Consul",
                   description="Runs smg and keeps its workers equal to the healthy serving registrations in "
                   "Consul.", epilog=_settings_epilog("router"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p_status = sub.add_parser(
        "status", help="what Consul says about the cluster; exit 0 healthy, 1 degraded, 2 Consul unreachable",
        description="What Consul says about the cluster: every group, its members and serving registration, "
        "and what each router routes to. Exit status: 0 healthy (every group serving with passing checks and "
        "all its ranks, no FATAL node, every router routing what Consul says); 1 degraded (the last line, or "
        "`problems` in --json, says why); 2 Consul unreachable or it refused the token.")
    p_status.add_argument("--json", action="store_true")
    p_doctor = sub.add_parser("doctor", help="preflight checks of this host: GPU, NCCL, RDMA, network, model, peers")
    p_doctor.add_argument("--json", action="store_true")
    p_nccl = sub.add_parser("nccl-check", help="preflight on every host of a group: rendezvous through Consul, "
                            "then an NCCL all-reduce with the engine's environment")
    p_nccl.add_argument("--gpus-per-node", type=int, default=None,
                        help="processes (GPUs) on this node; default: the group's, capped at the visible GPUs")
    p_nccl.add_argument("--backend", default="nccl", choices=("nccl", "gloo"), help="gloo: CPUs only, to try the tool")
    p_nccl.add_argument("--min-bytes", default="8")
    p_nccl.add_argument("--max-bytes", default="256M")
    p_nccl.add_argument("--iters", type=int, default=20)
    p_nccl.add_argument("--timeout", type=float, default=300.0, help="seconds for rendezvous and all-reduce")
    p_nccl.add_argument("--dist-port", type=int, default=None, help="default FLEET_DIST_PORT")
    p_nccl.add_argument("--json", action="store_true")
    p_config = sub.add_parser("config", help="check the configuration (exit 78 with the report when it is bad), "
                              "print what the container needs from it, or write docs/configuration.md")
    p_config.add_argument("action", choices=("check", "stop-wait", "show", "list", "docs"),
                          help="check: nothing on stdout when good; stop-wait: supervisord's stop wait in seconds; "
                          "show: every setting with this host's value and where it came from (default, preset, "
                          "file, env, command line), secrets as ***; list: every setting by section (--json: "
                          "the table); "
                          "docs: regenerate the settings tables of docs/configuration.md")
    p_config.add_argument("--json", action="store_true")
    p_config.add_argument("--docs-file", default=None, help="docs: the file to rewrite (default: the checkout's)")
    p_acl = sub.add_parser("acl-policy", help="print the Consul ACL policy a node, router or `status` needs "
                           "(sglang_fleet/data/acl/, docs/security.md)")
    p_acl.add_argument("role", choices=("node", "router", "status"))
    p_acl.add_argument("--cluster", default=None, help="default FLEET_CLUSTER")
    p_acl.add_argument("--consul-node", default="", help="node name of the Consul agent the nodes talk to "
                       "(sessions are created on it); node policies need it")
    sub.add_parser("sim-engine", help="CPU stand-in for sglang.launch_server (demos and tests only)",
                   add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "sim-engine":
        from sglang_fleet import sim_engine
        return sim_engine.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if engine_args and args.command not in TAKE_ENGINE_ARGS:
        parser.error(f"engine flags after `--` are for {', '.join(TAKE_ENGINE_ARGS)}, not {args.command}")
    if args.command == "acl-policy":
        from sglang_fleet import access
        if args.role == "node" and not args.consul_node:
            parser.error("acl-policy node needs --consul-node (the Consul agent's node name: `consul members`)")
        cluster = args.cluster or _load_or_exit(cluster_only=True).cluster
        print(access.render_policy(args.role, cluster, args.consul_node), end="")
        return 0
    if args.command == "config" and args.action in ("list", "docs"):  # the table, not a configuration
        from sglang_fleet import config_docs
        return config_docs.write(args.docs_file) if args.action == "docs" else config_docs.list_settings(args.json)

    if args.command == "config" and args.action == "show":
        from sglang_fleet import config_docs
        return config_docs.show(args.json, engine_args)
    # `status` only reads Consul: it needs the cluster, not a node's model and sizes.
    cfg = _load_or_exit(cluster_only=args.command == "status", engine_args=engine_args)
    logs.configure(cfg.log_format)
    if args.command == "config":
        if args.action == "stop-wait":
            print(cfg.stop_wait)
        return 0
    if args.command == "plan":
        from sglang_fleet import plan
        return plan.plan_command(cfg, node_rank=args.node_rank, dist_init_addr=args.dist_init_addr,
                                 as_json=args.json)
    if args.command == "node":
        from sglang_fleet import node
        _engine_flags_or_exit(cfg)
        _consul_rights_or_exit(cfg, "node")
        return node.run(cfg)
    if args.command == "router":
        from sglang_fleet import router
        _consul_rights_or_exit(cfg, "router")
        return router.run(cfg)
    if args.command == "status":
        from sglang_fleet import status
        return status.run(cfg, as_json=args.json)
    if args.command == "doctor":
        from sglang_fleet import doctor
        return doctor.run(cfg, as_json=args.json)
    if args.command == "nccl-check":
        from sglang_fleet import nccl_check
        return nccl_check.run(cfg, args)
    parser.error(f"unknown command {args.command}")
    return 2
