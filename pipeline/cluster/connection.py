"""The Ray dashboard (Jobs API) of a cluster: its address, the auth token, timeouts, one-line errors.

Every request has a timeout, so an address that drops packets fails in seconds instead of hanging. The token
follows Ray's own precedence (``RAY_AUTH_TOKEN``, then the file in ``RAY_AUTH_TOKEN_PATH``, then
``~/.ray/auth_token``; none with ``RAY_AUTH_MODE=disabled``) and travels as ``Authorization: Bearer ...``, which
the dashboard checks when the cluster runs with ``RAY_AUTH_MODE=token``. It is never printed: messages name
its source only.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from pipeline.errors import GenpipeError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
#: Uploading the project (working_dir) can take a while on a slow link.
UPLOAD_TIMEOUT_S = 600.0
#: A fresh head node answers HTTP before its job agent is up; submission retries this long.
AGENT_WAIT_S = 60.0


class ClusterError(GenpipeError):
    """The cluster cannot be reached, refuses us, or cannot run the job; nothing was submitted."""


def resolve_address(address: str | None) -> str:
    """``--address``, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS when it is an http(s) URL (a GCS address
    such as ``10.0.0.1:6379`` is not the dashboard), else the local default. ``host:port`` gets ``http://``."""
    candidates = [address, os.environ.get("RAY_API_SERVER_ADDRESS")]
    ray_address = os.environ.get("RAY_ADDRESS", "")
    if ray_address.startswith(("http://", "https://")):
        candidates.append(ray_address)
    url = next((c for c in candidates if c), DEFAULT_ADDRESS).strip().rstrip("/")
    if url.startswith("ray://"):
        raise ClusterError(f"--address {url}: give the dashboard's URL (http://HEAD:8265), not a Ray client address")
    if "://" not in url:
        url = f"http://{url}"
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
        ok = parsed.scheme in ("http", "https") and bool(parsed.hostname) and not any(c.isspace() for c in url)
    except ValueError:
        ok = False
    if not ok:
        raise ClusterError(f"--address {url}: expected the dashboard's URL, like http://HEAD:8265")
    return url


def auth_token() -> tuple[str | None, str]:
    """(token, where it came from) in Ray's precedence; (None, reason) when there is none to send."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token, "RAY_AUTH_TOKEN"
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file ({exc.strerror})") from None
        if not token:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return token, f"RAY_AUTH_TOKEN_PATH={path}"
    default = Path.home() / ".ray" / "auth_token"
    with contextlib.suppress(OSError):
        if token := default.read_text().strip():
            return token, str(default)
    return None, "no token set"


class Dashboard:
    """One cluster's Jobs API, with timeouts and errors a user can act on."""

    def __init__(self, address: str | None = None) -> None:
        self.url = resolve_address(address)
        self.token, self.token_source = auth_token()
        self.headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._client: Any = None

    # --- plain HTTP: the reachability check and the node list -------------------------------------------------
    def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        with self.errors():
            r = requests.get(
                self.url + path, params=params, headers=self.headers, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
            )
        self._raise_for_status(r.status_code, r.text, path)
        try:
            return r.json()
        except ValueError:
            raise ClusterError(f"{self.url}{path} did not answer JSON; is {self.url} a Ray dashboard?") from None

    def version(self) -> str:
        """The cluster's Ray version; fails fast with a one-line error when the dashboard is not there."""
        return str(self.get_json("/api/version").get("ray_version", "?"))

    def alive_nodes(self) -> list[dict[str, float]]:
        """Total resources of every alive node (the state API behind ``ray list nodes``)."""
        body = self.get_json("/api/v0/nodes", {"limit": 10000, "detail": "true"})
        rows = ((body.get("data") or {}).get("result") or {}).get("result") or []
        return [dict(row.get("resources_total") or {}) for row in rows if row.get("state") == "ALIVE"]

    # --- the Jobs API --------------------------------------------------------------------------------------
    @property
    def jobs(self):
        """The ``JobSubmissionClient`` (created after ``version()`` has shown the dashboard answers)."""
        if self._client is None:
            self.version()
            with self.errors():
                self._client = _TimedJobClient(self.url, headers=dict(self.headers))
        return self._client

    def submit(self, **kwargs: Any) -> str:
        """``submit_job``, retried while a fresh head's job agent is still starting."""
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                with self.errors():
                    return self.jobs.submit_job(**kwargs)
            except ClusterError as exc:
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(2.0)

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Turn what requests / the Ray SDK raise into one-line ``ClusterError``s."""
        try:
            yield
        except ClusterError:
            raise
        except requests.exceptions.Timeout as exc:
            waited = CONNECT_TIMEOUT_S if isinstance(exc, requests.exceptions.ConnectTimeout) else READ_TIMEOUT_S
            raise ClusterError(self._unreachable(f"no answer within {waited:g} s")) from None
        except (requests.exceptions.ConnectionError, ConnectionError) as exc:
            raise ClusterError(self._unreachable(_reason(exc))) from None
        except requests.exceptions.InvalidURL as exc:
            raise ClusterError(f"--address {self.url}: not a usable URL ({_one_line(str(exc))})") from None
        except AuthenticationError as exc:
            status = 403 if "Authentication failed" in str(exc) else 401
            raise ClusterError(self._auth_message(status)) from None
        except RuntimeError as exc:  # the SDK's "Request failed with status code N: body."
            raise ClusterError(f"the Ray dashboard at {self.url} said: {_one_line(str(exc))}") from None

    def _raise_for_status(self, status: int, text: str, path: str) -> None:
        if status in (401, 403):
            raise ClusterError(self._auth_message(status))
        if status == 404 and path == "/api/version":
            raise ClusterError(
                f"{self.url} answers but is not a Ray dashboard (404 on /api/version); "
                "check --address (the dashboard port, 8265 by default)"
            )
        if status >= 400:
            raise ClusterError(f"the Ray dashboard at {self.url} answered {status} on {path}: {_one_line(text)}")

    def _unreachable(self, reason: str) -> str:
        return f"cannot reach the Ray dashboard at {self.url}: {reason}; is the cluster up? check --address"

    def _auth_message(self, status: int) -> str:
        if status == 401 or not self.token:
            return (
                f"the Ray cluster at {self.url} requires a token (token authentication is on) and none was sent "
                f"({self.token_source}); set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (see infra/README.md)"
            )
        return (
            f"the Ray cluster at {self.url} rejected the token from {self.token_source}; "
            "use the cluster's token (kubectl get secret ..., see infra/README.md)"
        )


class _TimedJobClient(JobSubmissionClient):
    """The Ray SDK's client with a timeout on every request (it sets none, so a dead link would hang)."""

    def _do_request(self, method: str, endpoint: str, **kwargs: Any):
        upload = method == "PUT" and endpoint.startswith("/api/packages/")
        kwargs.setdefault("timeout", (CONNECT_TIMEOUT_S, UPLOAD_TIMEOUT_S if upload else READ_TIMEOUT_S))
        return super()._do_request(method, endpoint, **kwargs)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    for pattern, reason in (
        (r"Connection refused", "connection refused"),
        (r"Name or service not known|nodename nor servname|getaddrinfo failed|Failed to resolve", "unknown host"),
        (r"No route to host", "no route to host"),
        (r"Network is unreachable", "network unreachable"),
        (r"timed out", f"no answer within {CONNECT_TIMEOUT_S:g} s"),
    ):
        if re.search(pattern, text):
            return reason
    return _one_line(text)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split()).rstrip(".")
    return text if len(text) <= limit else text[: limit - 1] + "…"
