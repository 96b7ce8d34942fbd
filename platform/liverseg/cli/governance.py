"""`liverseg promote | rollback | history | requests | users`: the registry room's governance commands."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from liverseg.cli.app import ConfigOpt, SetOpt, VerboseOpt, app, fail, keys_help, load_stage, quietly
from liverseg.tracking.tags import SERVED_MODEL

ReasonOpt = typer.Option("", "--reason", help="why: recorded in the champion history (`liverseg history`)")
NameOpt = typer.Option(SERVED_MODEL, "--name", help="served registered model (candidates: NAME-candidates)")


@app.command(epilog=keys_help("PromoteConfig"))
def promote(
    store: str | None = typer.Option(None, help="slice store with the test split (not needed for --decline)"),
    name: str = NameOpt,
    min_dice: float | None = typer.Option(None, help="floor on the challenger's mean test Dice [promote.min_dice]"),
    margin: float | None = typer.Option(
        None, help="superior: CI's lower bound above this; non-inferior: above minus this [promote.margin]"
    ),
    rule: str | None = typer.Option(None, help="superior | non-inferior [promote.rule: superior]"),
    raw: Path | None = typer.Option(None, help="LiTS NIfTI folder: score on the original grid (the LiTS test Dice)"),
    reason: str = ReasonOpt,
    request: bool = typer.Option(False, "--request", help="ask a release user: run the gate and file a request"),
    approve: str | None = typer.Option(None, "--approve", metavar="ID", help="promote request ID's candidate"),
    decline: str | None = typer.Option(None, "--decline", metavar="ID", help="decline request ID (with --reason)"),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Make NAME-candidates@challenger NAME@champion (a served copy of the scored files) only if it passes the gate.

    The gate scores challenger and champion on the same test volumes and decides on the per-case Dice
    differences: a seeded paired bootstrap 95% CI of their mean (and a Wilcoxon p-value for the record).
    --rule superior: the CI's lower bound must be above --margin (default 0); --rule non-inferior
    --margin M: above -M. Every change is one hash-chained history record (`liverseg history --verify`).
    A shadow's agreement with the champion on live traffic (`serve --shadow`) is printed and recorded too.
    """
    from liverseg.core.config import PromoteConfig
    from liverseg.registry import requests as reqs

    if sum(x not in (None, False) for x in (request or None, approve, decline)) > 1:
        fail("give at most one of --request, --approve ID, --decline ID")
    if decline is not None:
        r = reqs.decline(name, decline, reason)
        typer.echo(
            f"DECLINED: request {r.request} (candidate v{r.candidate} by {r.requested_by}); champion stays v{r.to_version}"
        )
        return
    if store is None:
        fail("--store is required: the gate scores both models on its test split")
    s = load_stage(PromoteConfig, config, set_, None, "promote").promote
    s = s.model_copy(
        update={k: v for k, v in {"min_dice": min_dice, "margin": margin, "rule": rule}.items() if v is not None}
    )
    if request:
        filed, result = quietly("promote", verbose, lambda con: reqs.file_request(store, name, reason, raw, s))
        if filed is None:
            typer.echo(f"NOT REQUESTED: {name} challenger refused by the gate: {result.why}")
            raise typer.Exit(1)
        typer.echo(f"REQUESTED: #{filed.id} {name} candidate v{filed.candidate}; {result.why}")
        typer.echo(f"a release user approves: liverseg promote --approve {filed.id} --store {store}")
        return
    if approve is not None:
        d = quietly("promote", verbose, lambda con: reqs.approve(store, name, approve, reason, settings=s, raw=raw))
    else:
        from liverseg.registry.promote import promote as run_promote

        d = quietly("promote", verbose, lambda con: run_promote(store, name, reason=reason, raw=raw, settings=s))
    typer.echo(d.line())


@app.command()
def rollback(name: str = NameOpt, reason: str = ReasonOpt) -> None:
    """Put @champion back on the champion it replaced."""
    from liverseg.registry.promote import rollback as run_rollback

    old, new = run_rollback(name, reason)
    typer.echo(f"{name}: champion v{old} -> v{new}")


@app.command()
def history(
    name: str = NameOpt,
    verify: bool = typer.Option(False, "--verify", help="recompute the hash chain and check the champion against it"),
) -> None:
    """Every change of @champion (promote, rollback) and every request, newest first: when, who, from -> to,
    the gate's numbers, reason. --verify: exit 1 naming the first broken record."""
    from liverseg.registry.champion import alias_version
    from liverseg.registry.history import history as records
    from liverseg.registry.history import line
    from liverseg.registry.history import verify as check
    from liverseg.registry.requests import all_requests
    from liverseg.tracking.runs import client

    c = client()
    if verify:
        problems, summary = check(c, name, alias_version(c, name, "champion"))
        for p in problems:
            typer.echo(f"BROKEN: {p}")
        typer.echo(("FAILED: " if problems else "OK: ") + summary)
        raise typer.Exit(1 if problems else 0)
    found, bad = records(c, name)
    for b in bad:
        typer.echo(f"skipped: {b}", err=True)
    lines = [(r.at, line(r)) for r in found] + [(q.at, q.line(name)) for q in all_requests(c, name)]
    lines.sort(key=lambda x: x[0], reverse=True)
    typer.echo("\n".join(text for _, text in lines) if lines else f"{name}: the champion never changed")


@app.command()
def requests(name: str = NameOpt, all_: bool = typer.Option(False, "--all", help="also decided ones")) -> None:
    """Pending promotion requests (`promote --request`), oldest first: approve or decline with `promote`."""
    from liverseg.registry.requests import all_requests
    from liverseg.tracking.runs import client

    found = [r for r in all_requests(client(), name) if all_ or r.status == "pending"]
    typer.echo("\n".join(r.line(name) for r in found) if found else f"{name}: no pending requests")


users_app = typer.Typer(
    no_args_is_help=True, help="Team accounts on the MLflow server (admin login from the environment)."
)
app.add_typer(users_app, name="users")
RoleOpt = typer.Option(
    ...,
    help="reader (read only: serving) | monitor (also runs in liverseg-shadow) | scientist (train, tune, "
    "register candidates, request promotion) | release (also promote, roll back, approve)",
)


def _password(password: str | None, password_stdin: bool) -> str | None:
    from liverseg.core.errors import TeamError
    from liverseg.registry.team import password_from_stdin

    if password_stdin:
        if password is not None:
            raise TeamError("--password and --password-stdin: give one of them")
        return password_from_stdin(sys.stdin.read())
    return password


PasswordOpt = typer.Option(
    None,
    help="visible to every local user in the process list (/proc/*/cmdline) and kept in shell history: "
    "prefer --password-stdin. Default: a generated one, printed once",
)
StdinOpt = typer.Option(False, "--password-stdin", help="read the password from stdin (a pipe)")


@users_app.command("add")
def users_add(
    username: str = typer.Argument(..., help="login name (no ':' or control characters)"),
    role: str = RoleOpt,
    password: str | None = PasswordOpt,
    password_stdin: bool = StdinOpt,
    name: str = typer.Option(SERVED_MODEL, help="served registered model the role applies to"),
) -> None:
    """Create a user with a role's permissions, or complete an account a failure left without its role
    (needs LIVERSEG_ADMIN_USER / LIVERSEG_ADMIN_PASSWORD)."""
    from liverseg.registry.team import add_user, grants

    given = _password(password, password_stdin)
    pw, completed = add_user(username, role, given, name)
    granted = ", ".join(f"{p} on {m}" for _, m, p in grants(role, name))
    done = " (completed a half-made account: new password)" if completed else ""
    typer.echo(f"user {username} ({role}){done}: " + (f"{granted}; " if granted else "") + "READ on everything else")
    if given is None:
        typer.echo(f"password for {username} (shown once): {pw}")


@users_app.command("grant")
def users_grant(
    username: str = typer.Argument(..., help="login name"),
    role: str = RoleOpt,
    name: str = typer.Option(SERVED_MODEL, help="served registered model the role applies to"),
) -> None:
    """Give an existing user another role (replacing their liverseg role for NAME)."""
    from liverseg.registry.team import grant_role

    taken = grant_role(username, role, name)
    typer.echo(f"user {username}: role {role} on {name}" + (f" (was {', '.join(taken)})" if taken else ""))


@users_app.command("reset-password")
def users_reset_password(
    username: str = typer.Argument(..., help="login name"),
    password: str | None = PasswordOpt,
    password_stdin: bool = StdinOpt,
) -> None:
    """Set a user's password: given on stdin, or generated and printed once."""
    from liverseg.registry.team import reset_password

    given = _password(password, password_stdin)
    pw = reset_password(username, given)
    typer.echo(f"user {username}: password set" + ("" if given else f"; new password (shown once): {pw}"))
