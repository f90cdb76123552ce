"""``genpipe submit | status | logs | stop``: jobs on a Ray cluster through the Jobs API.

``submit`` validates the spec here first (nothing is sent when it is bad), refuses a job name that is already
running and a spec the cluster's nodes cannot hold, then submits ``python -m jobs.generate SPEC``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from datetime import UTC, datetime

from pipeline.errors import GenpipeError, JobFailed

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
POLL_S = 2.0
LOG_TAIL_LINES = 40


def register(sub: argparse._SubParsersAction) -> None:
    def add(name: str, fn, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        p.add_argument(
            "--address",
            help="the Ray dashboard URL, e.g. http://HEAD:8265 (default: "
            "RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, else http://127.0.0.1:8265)",
        )
        return p

    p = add("submit", _cmd_submit, "submit a job to a Ray cluster through the Jobs API")
    p.add_argument("spec", help="job spec YAML inside the working directory (or an fsspec URL)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a spec field")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish; exit 0 only if it SUCCEEDED")
    p.add_argument("--wait-timeout", type=float, metavar="S", help="with --wait: give up waiting after S seconds")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="also forward this environment variable (e.g. a secret the pods lack); repeatable",
    )
    p.add_argument("--working-dir", default=".", help="the project directory uploaded to the cluster (default: .)")
    p.add_argument(
        "--no-precheck",
        action="store_true",
        help="skip the check that the cluster's nodes hold the spec's actors (autoscaling clusters)",
    )
    p.add_argument(
        "--no-model-check",
        action="store_true",
        help="skip the local model check (the model exists only on the cluster)",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted; contact nothing")

    p = add("status", _cmd_status, "show a submitted job's status")
    p.add_argument("submission_id")
    p = add("logs", _cmd_logs, "print a submitted job's logs")
    p.add_argument("submission_id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job finishes")
    p = add("stop", _cmd_stop, "stop a submitted job")
    p.add_argument("submission_id")


# --- submit -------------------------------------------------------------------------------------------------
def _cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.cluster.submit import build_submission
    from pipeline.config import load_spec
    from pipeline.runner import check_spec

    spec = load_spec(args.spec, args.set)
    if not args.no_model_check:
        check_spec(spec, storage=False)  # the output's filesystem is the cluster's to have
    sub = build_submission(args.spec, spec, args.set, args.working_dir, args.env)
    if args.no_precheck:  # skipped here, so skipped in the job too (autoscaling clusters grow after submission)
        sub.runtime_env["env_vars"]["GENPIPE_NO_PRECHECK"] = "1"
    if sub.skipped_env:
        sub.notes.append(f"not forwarding {', '.join(sub.skipped_env)} (looks secret; --env NAME forwards it)")
    if args.dry_run:
        _print_notes(sub.notes)
        print(
            f"submission id: {sub.submission_id}\nentrypoint:    {sub.entrypoint}\n"
            f"working_dir:   {sub.runtime_env['working_dir']} (excludes {', '.join(sub.runtime_env['excludes'])})\n"
            f"env vars:      {', '.join(sub.runtime_env['env_vars']) or '-'} (values not shown)"
        )
        return 0
    dash = _dashboard(args.address)
    dash.version()
    _refuse_if_running(dash, sub.job)
    if not args.no_precheck:
        _precheck(dash, spec)
    sid = dash.submit(**sub.submit_kwargs())
    _print_notes(sub.notes)  # after the submission, so an error stays one line
    addr = f" --address {dash.url}"
    print(
        f"submitted {sid} to {dash.url}\n  follow: genpipe logs {sid} --follow{addr}\n"
        f"  status: genpipe status {sid}{addr}\n  stop:   genpipe stop {sid}{addr}",
        flush=True,
    )
    if not args.wait:
        return 0
    return _wait(dash, sid, args.wait_timeout)


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"genpipe: note: {note}", file=sys.stderr)


def _dashboard(address: str | None):
    from pipeline.cluster.connection import Dashboard  # imports Ray's SDK: only for these commands

    # The SDK logs every packaging step at INFO; genpipe prints what the operator needs itself.
    for name in ("ray.dashboard", "ray._private.runtime_env"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return Dashboard(address)


def _refuse_if_running(dash, job: str) -> None:
    from pipeline.cluster.submit import running_jobs

    with dash.errors():
        active = running_jobs(dash.jobs.list_jobs(), job)
    if active:
        sid = active[0].submission_id
        raise GenpipeError(
            f"job {job} is already running on {dash.url} as {sid}; follow it with "
            f"`genpipe logs {sid} --follow --address {dash.url}` or stop it with "
            f"`genpipe stop {sid} --address {dash.url}` before submitting again"
        )


def _precheck(dash, spec) -> None:
    from pipeline.cluster.resources import KNOBS, check_fit, resource_plan

    if spec.executor != "ray":
        return  # executor: local runs in the driver process, which asks for nothing
    problems = check_fit(resource_plan(spec), dash.alive_nodes())
    if problems:
        raise GenpipeError(
            f"the cluster at {dash.url} cannot run {spec.name}: {'; '.join(problems)}; lower "
            f"{KNOBS['generator']} (scorers: {KNOBS['scorer']}), add nodes, or pass --no-precheck "
            "if the cluster autoscales"
        )


def _wait(dash, sid: str, timeout: float | None) -> int:
    deadline = time.monotonic() + timeout if timeout else None
    last = None
    try:
        while True:
            with dash.errors():
                status = str(dash.jobs.get_job_status(sid).value)
            if status != last:
                print(f"{sid}: {status}", file=sys.stderr, flush=True)
                last = status
            if status in TERMINAL:
                break
            if deadline and time.monotonic() > deadline:
                raise GenpipeError(
                    f"{sid} is still {status} after {timeout:g} s; it keeps running: "
                    f"`genpipe logs {sid} --follow --address {dash.url}`"
                )
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        print(
            f"genpipe: stopped waiting; {sid} keeps running (genpipe stop {sid} --address {dash.url})", file=sys.stderr
        )
        return 130
    with dash.errors():
        info = dash.jobs.get_job_info(sid)
        logs = dash.jobs.get_job_logs(sid)
    print("\n".join(logs.rstrip("\n").splitlines()[-LOG_TAIL_LINES:]))
    if status != "SUCCEEDED":
        raise JobFailed(
            f"{sid}: {status}: {_one_line(info.message or '')}; full logs: genpipe logs {sid} --address {dash.url}"
        )
    print(f"{sid}: SUCCEEDED")
    return 0


# --- status / logs / stop ---------------------------------------------------------------------------------
def _job_info(dash, sid: str):
    dash.version()  # not a dashboard (its 404 on /api/version) or unreachable: said as such, not as "no job"
    try:
        with dash.errors():
            return dash.jobs.get_job_info(sid)
    except GenpipeError as exc:
        if "does not exist" in str(exc) or "status code 404" in str(exc):
            raise GenpipeError(
                f"no job {sid} on the cluster at {dash.url}; `ray job list --address {dash.url}` lists them"
            ) from None
        raise


def _cmd_status(args: argparse.Namespace) -> int:
    dash = _dashboard(args.address)
    info = _job_info(dash, args.submission_id)
    status = str(getattr(info.status, "value", info.status))
    meta = info.metadata or {}
    env_names = sorted(((info.runtime_env or {}).get("env_vars") or {}).keys())
    lines = [f"{info.submission_id}: {status}" + (f" — {_one_line(info.message)}" if info.message else "")]
    if meta.get("genpipe_job"):
        lines.append(f"  job:        {meta['genpipe_job']} (spec {meta.get('genpipe_spec', '?')})")
    lines += [
        f"  entrypoint: {info.entrypoint}",
        f"  started:    {_when(info.start_time)}",
        f"  ended:      {_when(info.end_time)}",
        f"  env vars:   {', '.join(env_names) or '-'} (values not shown)",
    ]
    print("\n".join(lines))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    dash = _dashboard(args.address)
    _job_info(dash, args.submission_id)
    if not args.follow:
        with dash.errors():
            sys.stdout.write(dash.jobs.get_job_logs(args.submission_id))
        return 0

    async def follow() -> None:
        async for chunk in dash.jobs.tail_job_logs(args.submission_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    with dash.errors():
        asyncio.run(follow())
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    dash = _dashboard(args.address)
    info = _job_info(dash, args.submission_id)
    with dash.errors():
        requested = dash.jobs.stop_job(args.submission_id)
    if not requested:
        print(f"{args.submission_id} had already finished: {getattr(info.status, 'value', info.status)}")
        return 0
    deadline = time.monotonic() + 30.0
    status = "STOPPING"
    while time.monotonic() < deadline:
        with dash.errors():
            status = str(dash.jobs.get_job_status(args.submission_id).value)
        if status in TERMINAL:
            break
        time.sleep(1.0)
    print(f"stop requested for {args.submission_id}; status now {status}")
    return 0


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else "-"


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `genpipe submit|status|logs|stop`")
