"""A small fake Hugging Face Hub served on 127.0.0.1, for tests that upload checkpoints.

It answers the requests that ``huggingface_hub`` (2.x, with ``HF_HUB_DISABLE_XET``) makes for
``HfApi.create_repo``, ``create_branch``, ``repo_info``, ``list_repo_tree`` and ``create_commit`` (with
deletions, and ``create_pr``: the commit goes to a new ``refs/pr/N`` based on the revision):

====================================================  =============  ====================================
request                                               name           answer
====================================================  =============  ====================================
``POST /api/repos/create``                            ``create``     ``{"url"}``; 409 if the repo exists
``GET  /api/models/{repo}[/revision/{rev}]``          ``repo-info``  ``{"id", "sha", "private", ...}``
``GET  /api/models/{repo}/refs``                      ``refs``       ``{"branches", "tags", "converts"}``
``POST /api/models/{repo}/branch/{branch}``           ``branch``     ``{}``; 409 if the branch exists
``POST /api/validate-yaml``                           ``validate``   ``{"errors": [], "warnings": []}``
``POST /api/models/{repo}/preupload/{rev}``           ``preupload``  every file ``uploadMode: "regular"``
``POST /api/models/{repo}/commit/{rev}``              ``commit``     ``{"commitUrl", "commitOid"[, "pullRequestUrl"]}``
``GET  /api/models/{repo}/tree/{rev}[/{path}]``        ``tree``       the files of ``rev`` (one page)
``GET  /api/whoami-v2``                               ``whoami``     ``{"name": "tester", ...}``
``GET|HEAD /{repo}/resolve/{rev}/{path}``             ``resolve``    the file's bytes (``X-Repo-Commit``, ``ETag``)
====================================================  =============  ====================================

Reads (``repo-info``, ``tree``, ``resolve``) take a branch or its commit oid (``snapshot_download``).
Anything else is answered 404 and recorded in :attr:`FakeHub.unknown`: a new release's new calls show.

Everything received is recorded: requests in :attr:`FakeHub.requests`, each commit's files in
:attr:`FakeHub.commits`; each repo keeps every ref's files (:attr:`FakeRepo.trees`; ``files``: main's).
:meth:`FakeHub.fail` makes a named endpoint answer an error status instead; :meth:`FakeHub.stall`
makes it read the request and then never answer (until the hub stops, or ``max_stall_s`` passed,
when it drops the connection), like a Hub that hangs. The server stops in
:meth:`FakeHub.stop` (used by the ``fake_hub`` fixture at teardown) and, as a safety net, by itself
after ``max_lifetime_s`` seconds.

Use it through the ``fake_hub`` and ``hub_env`` fixtures of tests/hub/conftest.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


__all__ = ["FAKE_TOKEN", "Commit", "FakeHub", "FakeRepo", "RecordedRequest"]

FAKE_USER = "tester"

# /api/{models|datasets|spaces}/{owner}/{name}[/{action}[/{rest}]]
_REPO_ROUTE = re.compile(
    r"^/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+(?:/[^/]+)?)"
    r"(?:/(?P<action>preupload|commit|branch|revision|refs|tree|paths-info)(?:/(?P<rest>.+))?)?$"
)
# /{owner}/{name}/resolve/{revision}/{path}: a file download (hf_hub_download)
_RESOLVE_ROUTE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    endpoint: str  # the route name ("create", "commit", ...) or "unknown"


@dataclass
class Commit:
    repo_id: str
    revision: str
    oid: str
    summary: str
    description: str
    files: dict[str, bytes]
    deleted: list[str]
    query: dict[str, list[str]]


@dataclass
class FakeRepo:
    repo_id: str
    private: bool
    repo_type: str = "model"
    branches: dict[str, str] = field(default_factory=dict)  # name (or refs/pr/N) -> head commit oid
    trees: dict[str, dict[str, bytes]] = field(default_factory=dict)  # ref -> its files
    pull_requests: list[str] = field(default_factory=list)  # "refs/pr/1", ...

    @property
    def files(self) -> dict[str, bytes]:
        """The files of "main"."""
        return self.trees.setdefault("main", {})


@dataclass
class _Failure:
    status: int
    message: str
    remaining: int | None  # None = always
    headers: dict[str, str]


def _oid(*parts: bytes) -> str:
    return hashlib.sha1(b"".join(parts)).hexdigest()


class FakeHub:
    """A loopback Hub. Start with :meth:`start` (or ``with FakeHub() as hub:``), stop with :meth:`stop`."""

    def __init__(self, *, max_lifetime_s: float = 120.0, echo_token_in_errors: bool = False, max_stall_s: float = 30.0):
        self.max_lifetime_s = max_lifetime_s
        self.max_stall_s = max_stall_s
        # A hostile server: error bodies repeat the Authorization header. Lets tests prove that
        # callers scrub the token from whatever the server sends back.
        self.echo_token_in_errors = echo_token_in_errors
        self.requests: list[RecordedRequest] = []
        self.commits: list[Commit] = []
        self.repos: dict[str, FakeRepo] = {}
        self.unknown: list[tuple[str, str]] = []
        self.downloads: list[str] = []  # paths served by "resolve" GETs and HEADs, in order
        self._failures: dict[str, _Failure] = {}
        self._stalls: dict[str, int | None] = {}  # endpoint -> how many more requests hang (None: all)
        self._release = threading.Event()  # set at stop: stalled handlers give up
        self.stalled: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # ----------------------------------------------------------------------------- lifecycle
    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        self._release.set()
        server, self._server = self._server, None
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------- configuration
    def fail(
        self,
        endpoint: str,
        status: int,
        message: str | None = None,
        *,
        times: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer ``status`` on ``endpoint`` (a route name from the module table), ``times`` times or always."""
        if message is None:
            message = {401: "Invalid credentials in Authorization header",
                       403: "You don't have the rights to create a model under this namespace",
                       404: "Repository not found", 503: "Service Unavailable",
                       500: "Internal Error - We're working hard to fix this as soon as possible!"}.get(status, f"error {status}")
        extra = dict(headers or {})
        if status in (401, 403):
            # What the real Hub sends for a bad token; huggingface_hub reads it to tell a bad token
            # apart from a missing repo.
            extra.setdefault("X-Error-Message", message)
        self._failures[endpoint] = _Failure(status, message, times, extra)

    def stall(self, endpoint: str, *, times: int | None = None) -> None:
        """Never answer ``endpoint`` (``times`` times, or always): the request is read, then nothing."""
        self._stalls[endpoint] = times

    def clear_failures(self) -> None:
        self._failures.clear()
        self._stalls.clear()

    def add_repo(self, repo_id: str, *, private: bool = False, branches: tuple[str, ...] = ("main",)) -> FakeRepo:
        repo = FakeRepo(repo_id, private, branches={b: _oid(repo_id.encode(), b.encode()) for b in branches},
                        trees={b: {} for b in branches})
        self.repos[repo_id] = repo
        return repo

    # ----------------------------------------------------------------------------- queries
    def requests_to(self, endpoint: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.endpoint == endpoint]

    @property
    def last_commit(self) -> Commit:
        if not self.commits:
            raise AssertionError(f"no commit received; requests: {[(r.method, r.path) for r in self.requests]}")
        return self.commits[-1]

    # ----------------------------------------------------------------------------- internals
    def _take_stall(self, endpoint: str) -> bool:
        with self._lock:
            if endpoint not in self._stalls:
                return False
            remaining = self._stalls[endpoint]
            if remaining is not None:
                if remaining <= 1:
                    del self._stalls[endpoint]
                else:
                    self._stalls[endpoint] = remaining - 1
            return True

    def _take_failure(self, endpoint: str) -> _Failure | None:
        with self._lock:
            f = self._failures.get(endpoint)
            if f is None:
                return None
            if f.remaining is not None:
                f.remaining -= 1
                if f.remaining <= 0:
                    del self._failures[endpoint]
            return f


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer sets Content-Length
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    timeout = 10  # drop idle keep-alive connections so threads end
    server_version = "FakeHub/1.0"

    def log_message(self, format, *args):  # silence the default stderr log
        pass

    # ------------------------------------------------------------------ plumbing
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Request-Id", "fake-request-id")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _not_found(self, code: str, message: str) -> None:
        self._send(404, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    # ------------------------------------------------------------------ routing
    def _route(self, method: str, path: str) -> tuple[str, dict]:
        if method == "POST" and path == "/api/repos/create":
            return "create", {}
        if method == "POST" and path == "/api/validate-yaml":
            return "validate", {}
        if method == "GET" and path == "/api/whoami-v2":
            return "whoami", {}
        m = _RESOLVE_ROUTE.match(path)
        if m and method in ("GET", "HEAD") and not path.startswith("/api/"):
            return "resolve", {"repo": m["repo"], "type": "models", "rest": unquote(m["rev"]), "path": unquote(m["path"])}
        m = _REPO_ROUTE.match(path)
        if m:
            action, rest = m["action"], m["rest"]
            args = {"repo": m["repo"], "type": m["type"], "rest": unquote(rest) if rest else None}
            if method == "GET" and action is None:
                return "repo-info", args
            if method == "GET" and action == "revision" and rest:
                return "repo-info", args
            if method == "GET" and action == "refs":
                return "refs", args
            if method == "GET" and action == "tree" and rest:
                revision, _, under = rest.partition("/")  # the revision is quoted: refs%2Fpr%2F1
                return "tree", dict(args, rest=unquote(revision), under=unquote(under))
            if method == "POST" and action in ("preupload", "commit", "branch") and rest:
                return action, args
        return "unknown", {}

    def _dispatch(self) -> None:
        fake = self.fake
        url = urlsplit(self.path)
        body = self._read_body()
        name, args = self._route(self.command, url.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        recorded = RecordedRequest(self.command, url.path, parse_qs(url.query), headers, body, name)
        with fake._lock:
            fake.requests.append(recorded)
        if name == "unknown":
            with fake._lock:
                fake.unknown.append((self.command, self.path))
            self._send(404, {"error": f"fake hub: no route for {self.command} {url.path}"})
            return
        if fake._take_stall(name):
            with fake._lock:
                fake.stalled.append(recorded)
            fake._release.wait(fake.max_stall_s)
            self.close_connection = True  # hang up without an answer
            return
        failure = fake._take_failure(name)
        if failure is not None:
            message = failure.message
            if fake.echo_token_in_errors:
                message += f" (received {headers.get('authorization', '<none>')})"
            self._send(failure.status, {"error": message}, failure.headers)
            return
        getattr(self, "_h_" + name.replace("-", "_"))(args, body, parse_qs(url.query))

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _dispatch

    # ------------------------------------------------------------------ handlers
    def _h_create(self, args, body, query) -> None:
        payload = json.loads(body or b"{}")
        name, org = payload.get("name"), payload.get("organization")
        repo_id = f"{org}/{name}" if org else f"{FAKE_USER}/{name}"
        url = f"{self.fake.endpoint}/{repo_id}"
        if repo_id in self.fake.repos:
            self._send(409, {"error": "You already created this model repo", "url": url})
            return
        repo = self.fake.add_repo(repo_id, private=payload.get("visibility") == "private")
        repo.repo_type = payload.get("type") or "model"
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _h_validate(self, args, body, query) -> None:
        self._send(200, {"errors": [], "warnings": []})

    def _h_whoami(self, args, body, query) -> None:
        self._send(200, {"type": "user", "name": FAKE_USER, "fullname": "Fake Tester", "orgs": [], "auth": {}})

    def _repo(self, args) -> FakeRepo | None:
        repo = self.fake.repos.get(args["repo"])
        if repo is None:
            self._not_found("RepoNotFound", "Repository not found")
        return repo

    @staticmethod
    def _ref(repo: FakeRepo, rev: str) -> str:
        """A branch name as is; a commit oid as the branch (or PR ref) whose head it is."""
        if rev in repo.branches:
            return rev
        return next((ref for ref, oid in repo.branches.items() if oid == rev), rev)

    def _h_repo_info(self, args, body, query) -> None:
        repo = self._repo(args)
        if repo is None:
            return
        rev = self._ref(repo, args["rest"] or "main")
        if rev not in repo.branches:
            self._not_found("RevisionNotFound", "Invalid rev id: " + rev)
            return
        siblings = [{"rfilename": p} for p in sorted(repo.trees.get(rev, {}))]
        self._send(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.branches[rev],
                         "private": repo.private, "siblings": siblings})

    def _h_refs(self, args, body, query) -> None:
        repo = self._repo(args)
        if repo is None:
            return
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in repo.branches.items()]
        self._send(200, {"branches": branches, "tags": [], "converts": []})

    def _h_branch(self, args, body, query) -> None:
        repo = self._repo(args)
        if repo is None:
            return
        branch = args["rest"]
        if branch in repo.branches:
            self._send(409, {"error": "Reference already exists"})
            return
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        repo.branches[branch] = repo.branches.get(start) or _oid(repo.repo_id.encode(), branch.encode())
        repo.trees[branch] = dict(repo.trees.get(start, {}))
        self._send(200, {})

    def _h_preupload(self, args, body, query) -> None:
        repo = self._repo(args)
        if repo is None:
            return
        if args["rest"] not in repo.branches:
            self._not_found("RevisionNotFound", "Invalid rev id: " + args["rest"])
            return
        files = json.loads(body or b"{}").get("files", [])
        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
        self._send(200, {"files": answer, "commitOid": repo.branches[args["rest"]]})

    def _h_commit(self, args, body, query) -> None:
        repo = self._repo(args)
        if repo is None:
            return
        rev = args["rest"]
        if rev not in repo.branches:
            self._not_found("RevisionNotFound", "Invalid rev id: " + rev)
            return
        summary = description = ""
        files: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                summary, description = value.get("summary", ""), value.get("description", "")
            elif key == "file":
                if value.get("encoding") != "base64":
                    self._send(400, {"error": f"unsupported encoding {value.get('encoding')!r}"})
                    return
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                # lfsFile would need the LFS/Xet upload that this fake never asks for.
                self._send(400, {"error": f"fake hub: unsupported commit item {key!r}"})
                return
        parent = repo.branches[rev]
        oid = _oid(parent.encode(), summary.encode(), *(p.encode() + files[p] for p in sorted(files)), *map(str.encode, deleted))
        answer = {"success": True, "commitOid": oid, "commitUrl": f"{self.fake.endpoint}/{repo.repo_id}/commit/{oid}"}
        tree = dict(repo.trees.get(rev, {}))
        if query.get("create_pr", ["0"])[0] in ("1", "true", "True"):  # a new refs/pr/N based on rev
            number = len(repo.pull_requests) + 1
            rev = f"refs/pr/{number}"
            repo.pull_requests.append(rev)
            answer["pullRequestUrl"] = f"{self.fake.endpoint}/{repo.repo_id}/discussions/{number}"
        for gone in deleted:
            for path in [p for p in tree if p == gone or p.startswith(gone.rstrip("/") + "/")]:
                del tree[path]
        tree.update(files)
        repo.trees[rev], repo.branches[rev] = tree, oid
        commit = Commit(repo.repo_id, rev, oid, summary, description, files, deleted, query)
        with self.fake._lock:
            self.fake.commits.append(commit)
        self._send(200, answer)

    def _h_tree(self, args, body, query) -> None:
        repo = self._repo(args)
        if repo is None:
            return
        args = dict(args, rest=self._ref(repo, args["rest"]))
        if args["rest"] not in repo.branches:
            self._not_found("RevisionNotFound", "Invalid rev id: " + args["rest"])
            return
        under = args["under"].strip("/")
        paths = [p for p in sorted(repo.trees.get(args["rest"], {})) if not under or p.startswith(under + "/")]
        tree = repo.trees[args["rest"]]
        self._send(200, [{"type": "file", "path": p, "size": len(tree[p]), "oid": _oid(tree[p])} for p in paths])


    def _h_resolve(self, args, body, query) -> None:
        repo = self._repo(args)
        if repo is None:
            return
        rev = self._ref(repo, args["rest"])
        if rev not in repo.branches:
            self._not_found("RevisionNotFound", "Invalid rev id: " + args["rest"])
            return
        data = repo.trees.get(rev, {}).get(args["path"])
        if data is None:
            self._not_found("EntryNotFound", f"{args['path']} does not exist on {rev}")
            return
        with self.fake._lock:
            self.fake.downloads.append(args["path"])
        etag = '"' + _oid(data) + '"'
        self._send(200, data, {"X-Repo-Commit": repo.branches[rev], "ETag": etag})


FAKE_TOKEN = "hf_fakeTOKENqdlm7Zx9Q2sentinel"  # distinctive, so tests can grep for leaks
