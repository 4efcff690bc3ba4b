"""The `gradmix` command line: inspect jobs and mixtures, register tasks, ask for estimates.

Operators also retire, activate and update tasks, pin and unpin a mixture,
and delete, archive or unarchive a job; `events` lists who changed what, and when.

Every command takes `--json` for machine-readable output. Connection options
default from the environment (GRADMIX_SERVER, GRADMIX_TOKEN, GRADMIX_TOKEN_FILE,
GRADMIX_TLS, GRADMIX_CA_CERT, GRADMIX_CLIENT_CERT, GRADMIX_CLIENT_KEY,
GRADMIX_TIMEOUT). A failure prints one line,
`gradmix: error: <CODE>: <message>`, and exits non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from gradmix.client import render
from gradmix.client.client import DEFAULT_SERVER, SelectionClient
from gradmix.client.errors import DeadlineExceeded, GradmixError, InvalidArgument, Unavailable
from gradmix.client.types import (
    DTYPES,
    METHODS,
    MODES,
    POLICIES,
    PROJECTORS,
    VALUE_KINDS,
    Mixture,
    PolicySettings,
    SketchSpec,
    SketchSpecError,
)
from gradmix.vocabulary import (
    DEFAULT_DTYPE,
    DEFAULT_METHOD,
    DEFAULT_MODE,
    DEFAULT_POLICY,
    DEFAULT_PROJECTOR,
    DEFAULT_VALUE_KIND,
)
from rich.console import RenderableType

EXIT_ERROR = 1


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _connection_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options valid before or after the command (the latter win)."""
    default: Callable[[Any], Any] = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    server = os.environ.get("GRADMIX_SERVER", DEFAULT_SERVER)
    parser.add_argument(
        "--server",
        default=default(server),
        # no %(default)s: a subcommand's default is SUPPRESS, which help cannot format
        help=f"host:port of the selection server (env GRADMIX_SERVER; default {server})",
    )
    parser.add_argument(
        "--tls", action="store_true", default=default(_env_flag("GRADMIX_TLS")),
        help="connect with TLS (env GRADMIX_TLS=1)",
    )
    parser.add_argument(
        "--ca-cert", default=default(os.environ.get("GRADMIX_CA_CERT")),
        help="PEM file of the CA to trust under --tls (env GRADMIX_CA_CERT)",
    )
    parser.add_argument(
        "--client-cert", default=default(os.environ.get("GRADMIX_CLIENT_CERT")),
        help="PEM certificate of this client, for mutual TLS (env GRADMIX_CLIENT_CERT)",
    )
    parser.add_argument(
        "--client-key", default=default(os.environ.get("GRADMIX_CLIENT_KEY")),
        help="PEM key of --client-cert (env GRADMIX_CLIENT_KEY)",
    )
    parser.add_argument(
        "--token", default=default(os.environ.get("GRADMIX_TOKEN")),
        help="bearer token (env GRADMIX_TOKEN)",
    )
    parser.add_argument(
        "--token-file", default=default(os.environ.get("GRADMIX_TOKEN_FILE")),
        help="file holding the bearer token, instead of --token (env GRADMIX_TOKEN_FILE)",
    )
    parser.add_argument(
        "--timeout", type=float, default=default(os.environ.get("GRADMIX_TIMEOUT", "10")),
        help="deadline of each call in seconds (env GRADMIX_TIMEOUT; default 10)",
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False),
        help="print machine-readable JSON",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `gradmix` (its surface is frozen by a test)."""
    parser = argparse.ArgumentParser(prog="gradmix", description=__doc__.splitlines()[0])
    _connection_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _connection_options(sub, top=False)
        return sub

    command("jobs", "list the jobs").add_argument(
        "--archived", action="store_true", help="list archived jobs too")
    _create_job_command(command("create-job", "create a job (idempotent for the same spec)"))
    command("tasks", "list a job's tasks").add_argument("job")
    command("anchors", "list a job's anchors").add_argument("job")
    sub = command("register-task", "register a task with a job (idempotent)")
    sub.add_argument("job")
    sub.add_argument("name")
    sub.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                     help="task metadata (repeatable)")
    sub = command("mixture", "show a job's current mixture")
    sub.add_argument("job")
    sub.add_argument("--version", type=int, default=0, help="a past version (default: latest)")
    sub.add_argument("--watch", action="store_true",
                     help="keep printing each new version (Ctrl-C to stop)")
    sub = command("history", "list a job's mixture versions")
    sub.add_argument("job")
    sub.add_argument("--after", type=int, default=0, help="only versions after this one")
    sub.add_argument("--limit", type=int, default=0, help="at most this many (0: all)")
    sub = command("estimate", "estimate the fine-tuning loss of task subsets")
    sub.add_argument("job")
    sub.add_argument("--subset", action="append", required=True, metavar="A,B,C",
                     help="comma-separated tasks (repeatable; '' is the empty subset)")
    sub.add_argument("--mode", choices=MODES, default=DEFAULT_MODE)
    sub.add_argument("--anchor", default="", help="anchor (default: the current one)")
    sub = command("select", "select tasks by score threshold, top-k or forward stepwise")
    sub.add_argument("job")
    sub.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD)
    sub.add_argument("--threshold", type=float, default=0.0,
                     help="threshold: keep tasks scoring below this (default 0)")
    sub.add_argument("--k", type=int, default=0, help="top_k: how many tasks")
    sub.add_argument("--mode", choices=MODES, default=DEFAULT_MODE, help="forward: estimator mode")
    sub.add_argument("--anchor", default="", help="anchor (default: the current one)")
    _lifecycle_commands(command)
    return parser


def _create_job_command(sub: argparse.ArgumentParser) -> None:
    """The job spec's fields as flags: the sketch spec, the target and the policy settings."""
    sub.add_argument("job")
    sketch = sub.add_argument_group("sketch spec (fixed for the job's life)")
    sketch.add_argument("--dim", type=int, required=True, help="projection dimension d")
    sketch.add_argument("--seed", type=int, default=0, help="projection seed (default 0)")
    sketch.add_argument("--projector", choices=PROJECTORS, default=DEFAULT_PROJECTOR,
                        help="projector kind (default %(default)s, as gradmix-train)")
    sketch.add_argument("--manifest-hash", default="",
                        help="hash of the sketched parameter manifest (default empty)")
    sketch.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE,
                        help="storage dtype of the sketches (default %(default)s)")
    sketch.add_argument("--value-kind", choices=VALUE_KINDS, default=DEFAULT_VALUE_KIND,
                        help="the sketched value f(x) (default %(default)s)")
    sub.add_argument("--target", default="", help="the target's description (e.g. its file)")
    policy = sub.add_argument_group("policy settings (unset: the server's defaults)")
    policy.add_argument("--policy", choices=POLICIES, default=DEFAULT_POLICY,
                        help="the policy (default %(default)s; the same one re-creates the job)")
    for name, kind, text in (
        ("regularization", float, "λ of the subset regression"),
        ("temperature", float, "τ, in units of the scores' standard error"),
        ("floor", float, "ε, the minimum weight of an active task"),
        ("subset-count", int, "subsets drawn by ensemble/surrogate"),
        ("subset-fraction", float, "q: subset size = ceil(q·n)"),
        ("prior-weight", float, "weight of a pending task, relative to the mean"),
        ("policy-seed", int, "subset-sampling seed"),
        ("smoothing", float, "share of the previous anchor's mixture kept, in [0, 1)"),
    ):
        policy.add_argument(f"--{name}", type=kind, default=None, help=text)


def _create_job(client: SelectionClient, args: argparse.Namespace) -> Any:
    try:
        sketch = SketchSpec(dim=args.dim, seed=args.seed, projector=args.projector,
                            manifest_hash=args.manifest_hash, dtype=args.dtype,
                            value_kind=args.value_kind)
    except SketchSpecError as exc:  # reported like the server's refusal would be
        raise InvalidArgument(str(exc)) from None
    names = ("regularization", "temperature", "floor", "subset_count", "subset_fraction",
             "prior_weight", "smoothing")
    fields = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.policy_seed is not None:
        fields["seed"] = args.policy_seed
    policy = PolicySettings(policy=args.policy, **fields)
    return client.create_job(args.job, sketch=sketch, policy=policy, target=args.target)


def _lifecycle_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """The operator's commands; each change goes into the job's event log (`events`)."""

    def change(name: str, help_text: str, subject: str = "job") -> argparse.ArgumentParser:
        sub = command(name, help_text)
        sub.add_argument(subject)
        sub.add_argument("--actor", default=os.environ.get("GRADMIX_ACTOR") or _user(),
                         help="who makes the change, for the event log (env GRADMIX_ACTOR; "
                              "default: the local user name)")
        return sub

    for name, help_text in (("retire-task", "retire a task: weight 0 from the next mixture "
                                            "version, until activate-task"),
                            ("activate-task", "bring a retired task back into the mixture")):
        change(name, help_text).add_argument("name")
    sub = change("update-task", "set or remove metadata keys of a registered task")
    sub.add_argument("name")
    sub.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                     help="metadata key to set (repeatable)")
    sub.add_argument("--remove-meta", action="append", default=[], metavar="KEY",
                     help="metadata key to remove (repeatable)")
    sub = change("pin", "pin a job's mixture to given weights (normalised; other tasks 0)")
    sub.add_argument("--weight", action="append", required=True, metavar="TASK=WEIGHT",
                     help="a task's weight (repeatable)")
    sub.add_argument("--reason", default="", help="why, for the event log")
    change("unpin", "publish the estimated mixture again").add_argument(
        "--reason", default="", help="why, for the event log")
    sub = change("delete-job", "stop serving a job and remove its store data", "name")
    sub.add_argument("--keep-data", action="store_true",
                     help="keep the store data in place (the same as archive-job)")
    sub.add_argument("--reason", default="", help="why, for the event log")
    change("archive-job", "stop serving a job, keeping its store data", "name").add_argument(
        "--reason", default="", help="why, for the event log")
    change("unarchive-job", "serve an archived job again", "name").add_argument(
        "--reason", default="", help="why, for the event log")
    sub = command("events", "list a job's event log: who changed what, when")
    sub.add_argument("job")
    sub.add_argument("--after", type=int, default=0, help="only events after this sequence")


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no user name in this environment
        return ""


def _parse_weights(items: Sequence[str]) -> dict[str, float]:
    weights: dict[str, float] = {}
    for item in items:
        task, sep, value = item.partition("=")
        try:
            weights[task] = float(value)
        except ValueError:
            raise InvalidArgument(f"--weight takes TASK=WEIGHT; got {item!r}") from None
        if not sep or not task:
            raise InvalidArgument(f"--weight takes TASK=WEIGHT; got {item!r}")
    return weights


def _run_lifecycle(client: SelectionClient, args: argparse.Namespace, out: TextIO) -> bool:
    """Dispatch an operator's command; False if `args` is another command."""
    name = args.command
    if name in ("retire-task", "activate-task", "update-task"):
        retired = {"retire-task": True, "activate-task": False}.get(name)
        meta = _parse_meta(getattr(args, "meta", []))
        task = client.update_task(args.job, args.name, meta,
                                  remove=getattr(args, "remove_meta", []), retired=retired)
        _emit(args, task, lambda t: render.tasks_table([t]), out)
    elif name in ("pin", "unpin", "delete-job", "archive-job", "unarchive-job"):
        if name == "pin":
            event = client.pin_mixture(args.job, _parse_weights(args.weight), args.reason)
        elif name == "unpin":
            event = client.unpin_mixture(args.job, args.reason)
        elif name == "unarchive-job":
            event = client.unarchive_job(args.name, args.reason)
        else:
            keep = name == "archive-job" or args.keep_data
            event = client.delete_job(args.name, keep_data=keep, reason=args.reason)
        _emit(args, event, lambda e: render.events_table([e]), out)
    elif name == "events":
        _emit(args, client.list_job_events(args.job, args.after), render.events_table, out)
    else:
        return False
    return True


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _emit(
    args: argparse.Namespace, value: Any, view: Callable[[Any], RenderableType], out: TextIO
) -> None:
    """`value` as one JSON line with --json, else as its view (`render`)."""
    if args.json:
        out.write(json.dumps(_jsonable(value), sort_keys=True) + "\n")
        out.flush()
    else:
        render.show(view(value), out)


def _parse_meta(items: Sequence[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--meta takes KEY=VALUE; got {item!r}")
        meta[key] = value
    return meta


#: Seconds of failed reconnects after which `mixture --watch` shows it is disconnected.
WATCH_GIVE_UP = 2.0


def _watch_mixture(client: SelectionClient, args: argparse.Namespace, out: TextIO) -> None:
    """Show the latest version, then each new one, until Ctrl-C. On a terminal the table
    is redrawn in place (a live view) and marked DISCONNECTED while the server is away;
    with --json or into a pipe each version is printed once, and a line on stderr says
    when the server goes and when it is back."""
    last = client.get_mixture(args.job)
    live = render.LiveView(out) if out.isatty() and not args.json else None

    def show(mixture: Mixture, since: float | None = None) -> None:
        if live is not None:
            live.update(render.mixture_table(mixture, since))
        elif since is None:
            _emit(args, mixture, render.mixture_table, out)
        else:
            print(f"gradmix: disconnected from {args.server}; reconnecting", file=sys.stderr)

    try:
        show(last)
        while True:
            try:
                with client.watch(
                    args.job, after_version=last.version, give_up_after=WATCH_GIVE_UP
                ) as stream:
                    for mixture in stream:
                        last = mixture
                        show(mixture)
                return
            except (Unavailable, DeadlineExceeded):
                show(last, time.time() - WATCH_GIVE_UP)
                while not _answers(client, args.job):
                    time.sleep(1.0)
                if live is not None:
                    show(last)
                else:
                    print(f"gradmix: reconnected to {args.server}", file=sys.stderr)
    finally:
        if live is not None:
            live.close()


def _answers(client: SelectionClient, job: str) -> bool:
    try:
        client.get_job(job)
    except (Unavailable, DeadlineExceeded):
        return False
    return True


def _run(client: SelectionClient, args: argparse.Namespace, out: TextIO) -> None:
    """Dispatch one parsed command."""
    name = args.command
    if _run_lifecycle(client, args, out):
        return
    if name == "jobs":
        _emit(args, client.list_jobs(include_archived=args.archived), render.jobs_table, out)
    elif name == "create-job":
        _emit(args, _create_job(client, args), lambda j: render.jobs_table([j]), out)
    elif name == "tasks":
        _emit(args, client.list_tasks(args.job), render.tasks_table, out)
    elif name == "anchors":
        _emit(args, client.list_anchors(args.job), render.anchors_table, out)
    elif name == "register-task":
        task = client.register_task(args.job, args.name, _parse_meta(args.meta))
        _emit(args, task, lambda t: render.tasks_table([t]), out)
    elif name == "mixture" and args.watch:
        _watch_mixture(client, args, out)
    elif name == "mixture":
        _emit(args, client.get_mixture(args.job, args.version), render.mixture_table, out)
    elif name == "history":
        mixtures = client.list_mixtures(args.job, args.after, args.limit)
        _emit(args, mixtures, render.history_table, out)
    elif name == "estimate":
        subsets = [[t for t in s.split(",") if t.strip()] for s in args.subset]
        subsets = [[t.strip() for t in s] for s in subsets]
        result = client.estimate_subsets(args.job, subsets, args.mode, anchor=args.anchor)
        _emit(args, result, render.estimate_table, out)
    elif name == "select":
        selection = client.select_tasks(
            args.job, args.method, args.threshold, args.k, args.mode, anchor=args.anchor
        )
        _emit(args, selection, render.selection_table, out)
    else:  # argparse refuses unknown commands before this
        raise InvalidArgument(f"unknown command {name!r}")


def _read(flag: str, path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise InvalidArgument(f"cannot read {flag} {path}: {error}") from None


def _client(args: argparse.Namespace) -> SelectionClient:
    for flag, value in (("--ca-cert", args.ca_cert), ("--client-cert", args.client_cert),
                        ("--client-key", args.client_key)):
        if value and not args.tls:
            raise InvalidArgument(f"{flag} needs --tls")
    token = args.token
    if args.token_file:
        if token:
            raise InvalidArgument("give --token or --token-file, not both")
        token = (_read("--token-file", args.token_file) or b"").decode().strip()
    return SelectionClient(
        args.server,
        timeout=args.timeout,
        tls=args.tls,
        root_certificates=_read("--ca-cert", args.ca_cert),
        certificate_chain=_read("--client-cert", args.client_cert),
        private_key=_read("--client-key", args.client_key),
        token=token,
        actor=getattr(args, "actor", None),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `gradmix`; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with _client(args) as client:
            _run(client, args, sys.stdout)
    except GradmixError as error:
        message = " ".join(str(error.details).split())
        print(f"gradmix: error: {error.code.name}: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 0 if args.command == "mixture" and args.watch else 130
    except BrokenPipeError:  # e.g. `gradmix history j | head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
