"""`eventstream config check|show`."""

from __future__ import annotations

import json
import sys

from eventstream import config as cfgmod
from eventstream.cli.main import EXIT_USAGE, add_config_args


def register(sub) -> None:
    p = sub.add_parser("config", help="check or show the effective configuration")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    check = csub.add_parser("check", help="validate the configuration; exit 2 with the reason if invalid")
    add_config_args(check)
    check.set_defaults(func=run_check)
    show = csub.add_parser("show", help="print the effective configuration (defaults < file < env < --set)")
    add_config_args(show)
    show.add_argument("--format", choices=("yaml", "json"), default="yaml", help="output format (default yaml)")
    show.set_defaults(func=run_show)


def load_or_report(args):
    try:
        return cfgmod.load_config(args.config, overrides=args.overrides)
    except cfgmod.ConfigError as exc:
        print(f"eventstream: config error: {exc}", file=sys.stderr)
        return None


def run_check(args) -> int:
    cfg = load_or_report(args)
    if cfg is None:
        return EXIT_USAGE
    print(f"config ok: {args.config or 'embedded defaults'}")
    return 0


def run_show(args) -> int:
    cfg = load_or_report(args)
    if cfg is None:
        return EXIT_USAGE
    if args.format == "json":
        print(json.dumps(cfg.to_dict(), indent=2))
    else:
        sys.stdout.write(cfgmod.dump_yaml(cfg))
    return 0
