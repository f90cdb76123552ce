"""What ``genpipe submit`` sends: ``python -m jobs.generate SPEC --set ...`` with a runtime_env that carries
the project (``working_dir``) and allow-listed environment variables only, plus metadata and a submission id.

Secrets stay out: ``--set`` values that carry a password are refused (the entrypoint is stored and shown by
the Jobs API), variables that look secret are forwarded only when named with ``--env``, and no value is ever
printed. On a cluster, secrets belong in the pods' environment (Kubernetes Secrets), which Ray workers inherit.
"""

from __future__ import annotations

import os
import posixpath
import re
import secrets
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.cluster.connection import ClusterError
from pipeline.config import parse_override
from pipeline.storage import local_path
from schemas.spec import JobSpec

ENTRYPOINT_MODULE = "jobs.generate"
#: Forwarded when set locally: offline switches, regions and endpoints — names that never hold a secret.
ENV_ALLOW = (
    "HF_HUB_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "GOOGLE_CLOUD_PROJECT",
)
ENV_ALLOW_PREFIXES = ("GENPIPE_",)
#: A prefix-matched name that looks like this is skipped unless named with --env.
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSW|PWD|KEY|CREDENTIAL|AUTH|PRIVATE|COOKIE|SESSION|DSN", re.IGNORECASE)
#: Never forwarded: the cluster has its own token; Ray sets its own addresses.
ENV_NEVER = re.compile(r"^RAY_(AUTH|ADDRESS|API_SERVER_ADDRESS)")
#: Not uploaded with the project: environments, outputs, VCS and caches.
EXCLUDES = [
    ".venv",
    "venv",
    ".git",
    "runs",
    "build",
    "dist",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "*.egg-info",
    "node_modules",
]
#: ``scheme://user:password@host`` — a URL carrying a password, or a ``password=`` / ``secret=`` / ``token=`` query
#: parameter. In a database URL the password may hold a "/" (SQLAlchemy takes everything up to the last "@"); in
#: the storage and web URLs that follow RFC 3986 the authority ends at the first "/", "?" or "#", so the "@" of
#: ``https://host:8080/a@b`` is in the path. Any other scheme is read the SQLAlchemy way: better refused than leaked.
_RFC3986_SCHEMES = r"(?:https?|s3a?|gs|gcs|az|abfs|abfss|adl|hf|ftp|sftp|ssh|webhdfs|hdfs|file|memory)"
URL_WITH_PASSWORD = re.compile(
    rf"(?<![A-Za-z0-9+.-]){_RFC3986_SCHEMES}://[^@\s:/?#]*:[^@\s/?#]*@"
    rf"|(?<![A-Za-z0-9+.-])(?!{_RFC3986_SCHEMES}://)[A-Za-z][A-Za-z0-9+.-]*://[^@\s:/]*:[^@\s]+@"
    r"|[?&](?:password|passwd|pwd|secret|token|sslpassword)=",
    re.IGNORECASE,
)


@dataclass
class Submission:
    """One job ready to hand to ``JobSubmissionClient.submit_job``."""

    job: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    submission_id: str
    skipped_env: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def submit_kwargs(self) -> dict[str, Any]:
        return {
            "entrypoint": self.entrypoint,
            "runtime_env": self.runtime_env,
            "metadata": self.metadata,
            "submission_id": self.submission_id,
        }


def submission_id(job: str, now: datetime | None = None) -> str:
    """``{job}-{UTC yyyymmdd-hhmmss}-{4 hex}``: sorts by time, says what it runs, never collides in practice."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return f"{job}-{stamp}-{secrets.token_hex(2)}"


def forwarded_env(explicit: list[str], environ: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """(variables to forward, names skipped because they look secret). ``explicit`` names are forwarded as they
    are and must be set."""
    environ = dict(os.environ if environ is None else environ)
    out: dict[str, str] = {}
    skipped: list[str] = []
    for name, value in sorted(environ.items()):
        if ENV_NEVER.match(name):
            continue
        if name in ENV_ALLOW:
            out[name] = value
        elif name.startswith(ENV_ALLOW_PREFIXES):
            (skipped.append(name) if SECRET_NAME.search(name) else out.__setitem__(name, value))
    for name in explicit:
        if ENV_NEVER.match(name):
            raise ClusterError(f"--env {name}: not forwarded; the cluster uses its own Ray token and addresses")
        if name not in environ:
            raise ClusterError(f"--env {name}: not set in this environment")
        out[name] = environ[name]
        if name in skipped:
            skipped.remove(name)
    return out, skipped


def check_overrides(overrides: list[str]) -> None:
    """Refuse ``--set`` values that carry a password: the entrypoint is stored on the cluster and shown to
    anyone who lists jobs."""
    for text in overrides:
        path, value = parse_override(text)
        if any(URL_WITH_PASSWORD.search(v) for v in _strings(value)):
            raise ClusterError(
                f"--set {'.'.join(path)}: the value carries a password, which would be stored in the "
                "job's entrypoint; put the URL in the spec from a secret-free source or give the "
                "cluster's pods the credentials (see infra/README.md)"
            )


def _strings(value: Any) -> Iterator[str]:
    """Every string in a --set value, also inside lists and mappings (``model.lora=[{path: URL}]``)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)


def build_submission(
    spec_path: str, spec: JobSpec, overrides: list[str], working_dir: str, env_names: list[str] = ()
) -> Submission:
    """The entrypoint, runtime_env and metadata for ``spec``; raises ``ClusterError`` when paths in the spec
    would not resolve on the cluster the way they did here."""
    check_overrides(overrides)
    working_dir = os.path.abspath(working_dir)
    if not os.path.isdir(working_dir):
        raise ClusterError(f"--working-dir {working_dir}: not a directory")
    notes: list[str] = []
    # A URL is read from there by the job; a file travels with the project.
    shown_spec = spec_path if "://" in spec_path else _inside(spec_path, working_dir, "spec")
    moved_manifest = None
    if _is_relative(spec.manifest):
        # Uploaded with the project; the job resolves it against the working directory, not the one it was
        # checked from here, so it is passed on in that form when the two differ.
        rel = _inside(spec.manifest, working_dir, "manifest")
        if rel != posixpath.normpath(spec.manifest.removeprefix("file://")):
            moved_manifest = rel
    elif (manifest := local_path(spec.manifest)) is not None:
        notes.append(f"manifest {manifest} is a local path: the head node must see it at that path")
    out = local_path(spec.output)
    if _is_relative(spec.output):
        raise ClusterError(
            f"output: {spec.output} is a relative local path, so on the cluster it would land in the "
            "job's temporary copy of the project; give --set output=s3://... (or gs://...) or an "
            "absolute path on storage every node mounts"
        )
    if out is not None:
        notes.append(f"output {out} is a local path: every Ray node must mount it at that path")
    env_vars, skipped = forwarded_env(list(env_names))
    # The job's driver passes env vars to ray.init too; let its values win instead of failing the merge.
    env_vars["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    argv = ["python", "-m", ENTRYPOINT_MODULE, shown_spec]
    for text in overrides:
        argv += ["--set", text]
    if moved_manifest is not None:
        argv += ["--set", f"manifest={moved_manifest}"]
        notes.append(f"manifest {spec.manifest} is passed as {moved_manifest}, relative to the working directory")
    return Submission(
        job=spec.name,
        entrypoint=shlex.join(argv),
        runtime_env={"working_dir": working_dir, "excludes": list(EXCLUDES), "env_vars": env_vars},
        metadata={"genpipe_job": spec.name, "genpipe_spec": shown_spec, "genpipe_submitter": "genpipe submit"},
        submission_id=submission_id(spec.name),
        skipped_env=skipped,
        notes=notes,
    )


def _is_relative(url: str) -> bool:
    path = url.removeprefix("file://")
    return "://" not in path and not os.path.isabs(os.path.expanduser(path))


def _inside(path: str, working_dir: str, what: str) -> str:
    """``path`` relative to the working dir (POSIX form), or a ``ClusterError`` when it lies outside."""
    absolute = os.path.abspath(path)
    rel = os.path.relpath(absolute, working_dir)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise ClusterError(
            f"{what} {path} is outside the working directory {working_dir}, so the cluster would not "
            "get it; run from the project root, pass --working-dir, or use an s3:// / gs:// URL"
        )
    first = rel.split(os.sep, 1)[0]
    if first in EXCLUDES:
        raise ClusterError(f"{what} {path} is under {first}/, which is not uploaded; move it or use an s3:// URL")
    return posixpath.join(*rel.split(os.sep))


def running_jobs(jobs: list[Any], job: str) -> list[Any]:
    """The cluster's PENDING/RUNNING jobs for this genpipe job name (by metadata, or by submission id prefix for
    jobs submitted before metadata was set)."""
    active = {"PENDING", "RUNNING"}
    out = []
    for info in jobs:
        status = str(getattr(info.status, "value", info.status))
        meta = info.metadata or {}
        sid = info.submission_id or ""
        ours = meta.get("genpipe_job") == job or re.match(rf"^{re.escape(job)}-\d{{8}}-\d{{6}}-", sid)
        if status in active and ours:
            out.append(info)
    return out
