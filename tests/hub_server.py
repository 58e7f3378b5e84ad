"""A small in-process fake of the Hugging Face Hub HTTP API, for tests (stdlib only + PyYAML).

The REAL ``huggingface_hub`` client (1.3x and 2.x) talks to it when ``HF_ENDPOINT`` points at ``server.url``.
Storage is in memory and git-like: each repo has refs (``refs/heads/*``, ``refs/tags/*``, ``refs/pr/N``)
pointing at commits; a commit is a full snapshot ``{path: bytes}`` with a random 40-hex oid and a parent.
New repos start with one "initial commit" holding ``.gitattributes``, like on the real Hub.

Implemented (``{t}`` is ``models`` or ``datasets``; revisions may be branch, tag, ``refs/pr/N`` or commit oid):
    GET  /api/whoami-v2                         needs ``Authorization: Bearer <server.token>``
    POST /api/validate-yaml                     400 on invalid YAML / non-mapping / a few bad field types
    GET  /api/agent-harnesses                   empty registry (fetched once by the 2.x client)
    POST /api/repos/create, DELETE /api/repos/delete    409 if it exists / 404 RepoNotFound
    GET  /api/{t}/{repo}[/revision/{rev}]       repo info: id, sha, siblings (+size/blobId with ?blobs=1), ...
    GET  /api/{t}/{repo}/tree/{rev}[/{path}]    ?recursive, ?expand (lastCommit), Link-header pagination
    POST /api/{t}/{repo}/paths-info/{rev}       form or JSON body
    POST /api/{t}/{repo}/preupload/{rev}        every file ``uploadMode: regular`` + ``oid`` of the remote blob
    POST /api/{t}/{repo}/commit/{rev}           NDJSON header/file/deletedFile/deletedFolder, parentCommit, ?create_pr=1
    GET  /api/{t}/{repo}/refs, GET /api/{t}/{repo}/commits/{rev}
    POST|DELETE /api/{t}/{repo}/branch/{name}, POST /api/{t}/{repo}/tag/{rev}, DELETE /api/{t}/{repo}/tag/{name}
    HEAD|GET /[datasets/]{repo}/resolve/{rev}/{path}    ETag, X-Repo-Commit, Content-Length, Range
Errors carry ``X-Error-Code`` (RepoNotFound / RevisionNotFound / EntryNotFound) so the client raises its own classes.
Writes need the token (401 otherwise); private repos are invisible (404) without it.

Not implemented: LFS / Xet (``lfsFile`` ops get 400, so keep HF_HUB_DISABLE_XET=1), spaces, discussions/PR API
beyond the ``refs/pr/N`` ref itself, super-squash, repo settings/move, gating, short commit oids, persistence.

Test helpers: ``requests`` (log of Request(method, path, query, status)), ``downloads()``, ``uploaded_paths``
(paths sent inline in each successful commit), ``commit_log``, ``fail_next()``, ``corrupt()``, ``files()``,
``head()``, ``reset()``.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_counter = itertools.count()


def git_blob_oid(data: bytes) -> str:
    """Git blob sha1, the same value the client computes for regular files (``sha.git_hash``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000)


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, bytes]
    title: str
    message: str = ""
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    id: str
    type: str
    private: bool
    created: str = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # "refs/heads/main" -> oid
    num_prs: int = 0


@dataclass
class Request:
    method: str
    path: str  # decoded path, e.g. "/user/repo/resolve/main/a/b.bin"
    query: dict[str, list[str]]
    status: int = 0


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers or {}, extra


class HubServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str = "hf_fake_test_token",
                 username: str = "test-user"):
        self.token, self.username = token, username
        self._lock = threading.RLock()
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        self._thread: threading.Thread | None = None
        self.reset()

    # ---------------------------------------------------------------- lifecycle & test helpers
    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def reset(self) -> None:
        """Forget all repos, logs and pending failures (the server keeps running)."""
        with self._lock:
            self.repos: dict[tuple[str, str], Repo] = {}
            self.requests: list[Request] = []
            self.commit_log: list[dict] = []
            self._failures: list[list] = []
            self.tree_page_size = 1000  # as on the Hub (50 with expand=true); lower it to exercise pagination

    @property
    def uploaded_paths(self) -> list[list[str]]:
        """For each successful commit (in order), the paths whose content was sent in it."""
        return [c["added"] for c in self.commit_log]

    def downloads(self, repo_id: str | None = None) -> list[str]:
        """File paths fetched with GET .../resolve/... (HEAD requests excluded), in request order."""
        out = []
        for r in self.requests:
            parts = r.path.strip("/").split("/")
            if parts[0] == "datasets":
                parts = parts[1:]
            if r.method == "GET" and len(parts) > 3 and parts[2] == "resolve":
                if repo_id is None or "/".join(parts[:2]) == repo_id:
                    rest = parts[4:] if parts[3] != "refs" else parts[6:]
                    out.append("/".join(rest))
        return out

    def fail_next(self, path_substring: str, status: int = 500, count: int = 1, method: str | None = None) -> None:
        """Answer the next ``count`` requests whose decoded path contains ``path_substring`` with ``status``,
        without processing them (the request body is read and discarded, so no state changes)."""
        with self._lock:
            self._failures.append([path_substring, status, count, method])

    def corrupt(self, repo_id: str, path: str, revision: str = "main", data: bytes | None = None,
                repo_type: str = "model") -> None:
        """Replace a stored file's bytes in place (same commit oid). Default: flip the middle byte.
        ETag/Content-Length are computed from what is stored, so they reflect the corruption."""
        with self._lock:
            commit = self._resolve(self._repo(repo_type, repo_id, self.token), revision)[1]
            old = commit.files[path]
            if data is None:
                i = len(old) // 2
                data = old[:i] + bytes([old[i] ^ 0xFF]) + old[i + 1:] if old else b"\0"
            commit.files[path] = data

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        with self._lock:
            return dict(self._resolve(self._repo(repo_type, repo_id, self.token), revision)[1].files)

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            return self._resolve(self._repo(repo_type, repo_id, self.token), revision)[1].oid

    # ---------------------------------------------------------------- model
    def _repo(self, rtype: str, repo_id: str, auth: str | None) -> Repo:
        repo = self.repos.get((rtype, repo_id))
        if repo is None or (repo.private and auth != self.token):
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, rev: str) -> tuple[str | None, Commit]:
        if rev in repo.commits:
            return None, repo.commits[rev]
        for ref in (rev, "refs/heads/" + rev, "refs/tags/" + rev):
            if ref.startswith("refs/") and ref in repo.refs:
                return ref, repo.commits[repo.refs[ref]]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _new_commit(self, repo: Repo, parent: Commit | None, files: dict, title: str, message: str = "") -> Commit:
        seed = f"{repo.id}{parent and parent.oid}{title}{time.time_ns()}{next(_counter)}".encode()
        c = Commit(hashlib.sha1(seed).hexdigest(), parent and parent.oid, files, title, message)
        repo.commits[c.oid] = c
        return c

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{'datasets/' if repo.type == 'dataset' else ''}{repo.id}"

    @staticmethod
    def _dirs(files) -> set[str]:
        return {p.rsplit("/", i)[0] for p in files for i in range(1, p.count("/") + 1)}

    def _last_commit(self, repo: Repo, c: Commit, path: str) -> dict:
        def state(x: Commit):
            return x.files.get(path) if path in x.files else sorted(
                (p, v) for p, v in x.files.items() if p.startswith(path + "/"))
        while c.parent and state(repo.commits[c.parent]) == state(c):
            c = repo.commits[c.parent]
        return {"id": c.oid, "title": c.title, "date": c.date}

    def _entry(self, repo: Repo, c: Commit, path: str, expand: bool) -> dict:
        if path in c.files:
            data = c.files[path]
            e = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}
        else:
            sub = sorted((p, git_blob_oid(v)) for p, v in c.files.items() if p.startswith(path + "/"))
            e = {"type": "directory", "oid": hashlib.sha1(repr(sub).encode()).hexdigest(), "size": 0, "path": path}
        if expand:
            e["lastCommit"] = self._last_commit(repo, c, path)
        return e

    def _card_data(self, c: Commit):
        try:
            return _front_matter(c.files.get("README.md", b"").decode())
        except Exception:
            return None

    # ---------------------------------------------------------------- HTTP dispatch
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        split = urlsplit(h.path)
        query = parse_qs(split.query, keep_blank_values=True)
        raw = [s for s in split.path.split("/") if s != ""]
        segs = [unquote(s) for s in raw]
        body = _read_body(h)
        req = Request(h.command, unquote(split.path), query)
        if segs != ["api", "agent-harnesses"]:
            with self._lock:
                self.requests.append(req)
        auth_header = h.headers.get("Authorization", "")
        auth = auth_header[7:] if auth_header.startswith("Bearer ") else None
        headers: dict[str, str] = {}
        try:
            with self._lock:
                for f in self._failures:
                    if f[2] > 0 and f[0] in req.path and f[3] in (None, h.command):
                        f[2] -= 1
                        raise HubError(f[1], "Injected failure (fail_next)")
                if auth is not None and auth != self.token:
                    raise HubError(401, "Invalid credentials in Authorization header")
                status, payload = self._route(h.command, segs, query, body, auth, headers, h.headers)
        except HubError as e:
            status, payload = e.status, {"error": e.message, **e.extra}
            headers = {**e.headers, "X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
        except Exception as e:  # a bug in this server: answer 500 rather than hanging the client
            status, payload, headers = 500, {"error": f"{type(e).__name__}: {e}"}, {}
        req.status = status
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Content-Length", str(len(data)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _route(self, method, segs, query, body, auth, out_headers, in_headers):
        write = method in ("POST", "DELETE", "PUT")
        if segs[:1] == ["api"]:
            tail = segs[1:]
            if tail == ["whoami-v2"]:
                if auth is None:
                    raise HubError(401, "Invalid credentials in Authorization header")
                return 200, {"type": "user", "id": "0" * 24, "name": self.username, "fullname": self.username,
                             "email": f"{self.username}@example.com", "emailVerified": True, "isPro": False,
                             "orgs": [], "auth": {"type": "access_token",
                                                  "accessToken": {"displayName": "fake", "role": "write"}}}
            if tail == ["agent-harnesses"]:
                return 200, {"standardEnvVars": [], "harnesses": {}}
            if tail == ["validate-yaml"] and method == "POST":
                return _validate_yaml(json.loads(body or b"{}").get("content", ""))
            if write and auth is None:
                raise HubError(401, "You must be authenticated to do this")
            if tail[:1] == ["repos"] and method in ("POST", "DELETE"):
                p = json.loads(body or b"{}")
                rtype = p.get("type") or "model"
                repo_id = f"{p.get('organization') or self.username}/{p['name']}"
                if tail == ["repos", "delete"]:
                    self._repo(rtype, repo_id, auth)
                    del self.repos[(rtype, repo_id)]
                    return 200, {}
                if tail == ["repos", "create"]:
                    private = p.get("visibility", "private" if p.get("private") else "public") == "private"
                    repo = Repo(repo_id, rtype, private)
                    url = self._repo_url(repo)
                    if (rtype, repo_id) in self.repos:
                        raise HubError(409, f"You already created this {rtype} repo", url=url)
                    c = self._new_commit(repo, None, {".gitattributes": GITATTRIBUTES}, "initial commit")
                    repo.refs["refs/heads/main"] = c.oid
                    self.repos[(rtype, repo_id)] = repo
                    return 200, {"url": url, "name": repo_id, "id": repo_id}
            if len(segs) >= 4 and segs[1] in ("models", "datasets"):
                repo = self._repo(segs[1][:-1], f"{segs[2]}/{segs[3]}", auth)
                return self._api_repo(method, repo, segs[4:], query, body, in_headers, out_headers)
            raise HubError(404, f"Unknown endpoint {'/'.join(segs)}")
        # file download: [datasets/]{ns}/{name}/resolve/{rev}/{path}
        rtype = "model"
        if segs[:1] == ["datasets"]:
            rtype, segs = "dataset", segs[1:]
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            repo = self._repo(rtype, f"{segs[0]}/{segs[1]}", auth)
            rev, rest = _take_rev(segs[3:])
            commit = self._resolve(repo, rev)[1]
            path = "/".join(rest)
            out_headers["X-Repo-Commit"] = commit.oid
            if path not in commit.files:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
            data = commit.files[path]
            out_headers.update({"ETag": f'"{git_blob_oid(data)}"', "Content-Type": "application/octet-stream",
                                "Accept-Ranges": "bytes", "Content-Length": str(len(data))})
            rng = in_headers.get("Range")
            if rng and rng.startswith("bytes="):
                start_s, _, end_s = rng[6:].split(",")[0].partition("-")
                start = int(start_s) if start_s else max(len(data) - int(end_s), 0)
                end = int(end_s) if start_s and end_s else len(data) - 1
                if start >= len(data) and data:
                    raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
                data, total = data[start:end + 1], len(data)
                out_headers.update({"Content-Range": f"bytes {start}-{start + len(data) - 1}/{total}",
                                    "Content-Length": str(len(data))})
                return 206, data
            return 200, data
        raise HubError(404, f"Not found: /{'/'.join(segs)}")

    def _api_repo(self, method, repo: Repo, rest, query, body, in_headers, out_headers):
        q1 = {k: v[-1] for k, v in query.items()}
        action = rest[0] if rest else None
        if method == "GET" and action in (None, "revision"):
            c = self._resolve(repo, _take_rev(rest[1:])[0] if rest else "main")[1]
            blobs = _truthy(q1.get("blobs"))
            siblings = [{"rfilename": p, **({"size": len(d), "blobId": git_blob_oid(d)} if blobs else {})}
                        for p, d in sorted(c.files.items())]
            card = self._card_data(c) or {}
            info = {"_id": hashlib.md5(repo.id.encode()).hexdigest()[:24], "id": repo.id, "modelId": repo.id,
                    "author": repo.id.split("/")[0], "sha": c.oid, "lastModified": c.date,
                    "createdAt": repo.created, "private": repo.private, "gated": False, "disabled": False,
                    "downloads": 0, "likes": 0, "tags": card.get("tags") or [], "siblings": siblings,
                    "library_name": card.get("library_name"), "cardData": card or None}
            if "expand" in query or "expand[]" in query:
                keep = set(query.get("expand", []) + query.get("expand[]", [])) | {"id", "_id"}
                info = {k: v for k, v in info.items() if k in keep}
            return 200, info
        if method == "GET" and action == "tree":
            rev, path_parts = _take_rev(rest[1:])
            c = self._resolve(repo, rev)[1]
            prefix = "/".join(path_parts).strip("/")
            recursive, expand = _truthy(q1.get("recursive")), _truthy(q1.get("expand"))
            under = [p for p in c.files if not prefix or p.startswith(prefix + "/")]
            if prefix and not under:
                raise HubError(404, f"Entry not found: {prefix}", "EntryNotFound")
            paths = sorted(set(under) | {d for d in self._dirs(under) if not prefix or d.startswith(prefix + "/")})
            depth = prefix.count("/") + 1 if prefix else 0
            if not recursive:
                paths = [p for p in paths if p.count("/") == depth]
            size = self.tree_page_size if not expand else min(self.tree_page_size, 50)
            start = int(q1.get("cursor", 0))
            page = paths[start:start + size]
            if start + size < len(paths):
                enc_path = "/" + quote(prefix, safe="") if prefix else ""
                nxt = urlencode({**q1, "cursor": str(start + size)})
                url = f"{self.url}/api/{repo.type}s/{repo.id}/tree/{quote(rev, safe='')}{enc_path}?{nxt}"
                out_headers["Link"] = f'<{url}>; rel="next"'
            return 200, [self._entry(repo, c, p, expand) for p in page]
        if method == "POST" and action == "paths-info":
            c = self._resolve(repo, _take_rev(rest[1:])[0])[1]
            if in_headers.get("Content-Type", "").startswith("application/json"):
                p = json.loads(body)
                paths, expand = p.get("paths", []), bool(p.get("expand"))
            else:
                form = parse_qs(body.decode(), keep_blank_values=True)
                paths, expand = form.get("paths", []), _truthy((form.get("expand") or ["false"])[-1])
            dirs = self._dirs(c.files)
            return 200, [self._entry(repo, c, p.strip("/"), expand) for p in paths
                         if p.strip("/") in c.files or p.strip("/") in dirs]
        if method == "POST" and action == "preupload":
            c = self._resolve(repo, _take_rev(rest[1:])[0])[1]
            files = json.loads(body).get("files", [])
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                    "oid": git_blob_oid(c.files[f["path"]]) if f["path"] in c.files else None}
                                   for f in files], "commitOid": c.oid}
        if method == "POST" and action == "commit":
            return self._commit(repo, _take_rev(rest[1:])[0], _truthy(q1.get("create_pr")), body)
        if method == "GET" and action == "refs":
            def refs(prefix):
                return [{"name": r[len(prefix):] if prefix != "refs/pr/" else r, "ref": r, "targetCommit": o}
                        for r, o in sorted(repo.refs.items()) if r.startswith(prefix)]
            return 200, {"branches": refs("refs/heads/"), "tags": refs("refs/tags/"), "converts": [],
                         "pullRequests": refs("refs/pr/")}
        if method == "GET" and action == "commits":
            c, out = self._resolve(repo, _take_rev(rest[1:])[0])[1], []
            while c is not None:
                out.append({"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
                            "authors": [{"user": self.username, "avatar": ""}]})
                c = repo.commits.get(c.parent) if c.parent else None
            return 200, out
        if action in ("branch", "tag") and method in ("POST", "DELETE") and len(rest) >= 2:
            name = _take_rev(rest[1:])[0]
            p = json.loads(body) if body else {}
            ref = f"refs/heads/{name}" if action == "branch" else f"refs/tags/{p.get('tag', name)}"
            if method == "DELETE":
                if ref not in repo.refs or ref == "refs/heads/main":
                    raise HubError(404 if ref not in repo.refs else 403, f"Cannot delete {ref}")
                del repo.refs[ref]
                return 200, {}
            if ref in repo.refs:
                raise HubError(409, f"Reference already exists: {ref}")
            start = p.get("startingPoint", "main") if action == "branch" else name
            repo.refs[ref] = self._resolve(repo, start)[1].oid
            return 200, {}
        raise HubError(404, f"Unknown endpoint {method} {'/'.join(rest)}")

    def _commit(self, repo: Repo, rev: str, create_pr: bool, body: bytes):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "First NDJSON line must be the header")
        header = lines[0]["value"]
        ref, base = self._resolve(repo, rev)
        if ref is None or ref.startswith("refs/tags/"):
            raise HubError(400, f"Invalid rev id: {rev} (commits must target a branch or a PR ref)")
        parent = header.get("parentCommit")
        if parent and create_pr:
            base = self._resolve(repo, parent)[1]
        elif parent and parent != base.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files, added, deleted = dict(base.files), [], []
        for op in lines[1:]:
            key, v = op.get("key"), op.get("value", {})
            path = v.get("path", "")
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise HubError(400, f"Invalid path: {path!r}")
            if key == "file":
                files[path] = (base64.b64decode(v["content"]) if v.get("encoding") == "base64"
                               else v["content"].encode())
                added.append(path)
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
                deleted.append(path)
            elif key == "deletedFolder":
                gone = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                if not gone:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del files[p]
                deleted.extend(gone)
            elif key == "lfsFile":
                raise HubError(400, "LFS uploads are not supported by the fake Hub (preupload says 'regular')")
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        c = self._new_commit(repo, base, files, header.get("summary", ""), header.get("description", ""))
        pr_url = None
        if create_pr:
            repo.num_prs += 1
            ref = f"refs/pr/{repo.num_prs}"
            pr_url = f"{self._repo_url(repo)}/discussions/{repo.num_prs}"
        repo.refs[ref] = c.oid
        self.commit_log.append({"repo_id": repo.id, "ref": ref, "oid": c.oid, "added": added, "deleted": deleted})
        return 200, {"success": True, "commitOid": c.oid, "commitUrl": f"{self._repo_url(repo)}/commit/{c.oid}",
                     "commitMessage": c.title, "hookOutput": "", "pullRequestUrl": pr_url}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client pools connections
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms delayed-ACK stalls

    def log_message(self, *args) -> None:  # silence stderr
        pass

    def do_GET(self) -> None:
        self.server.hub._handle(self)

    do_HEAD = do_POST = do_DELETE = do_PUT = do_GET


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            n = int(h.rfile.readline().split(b";")[0].strip(), 16)
            chunk = h.rfile.read(n + 2)[:n]
            if n == 0:
                return b"".join(chunks)
            chunks.append(chunk)
    return h.rfile.read(int(h.headers.get("Content-Length") or 0))


def _take_rev(parts: list[str]) -> tuple[str, list[str]]:
    """Revision from decoded path segments: one (quoted) segment, or an unquoted 'refs/pr/N'."""
    if not parts:
        raise HubError(400, "Missing revision")
    if parts[0] == "refs" and len(parts) >= 3:
        return "/".join(parts[:3]), parts[3:]
    return parts[0], parts[1:]


def _truthy(v: str | None) -> bool:
    return (v or "").lower() in ("1", "true", "yes")


def _front_matter(content: str):
    import yaml

    content = content.lstrip("\ufeff")
    if not content.startswith("---"):
        return None
    end = content.find("\n---", 3)
    if end < 0:
        return None
    return yaml.safe_load(content[3:end])


def _validate_yaml(content: str):
    try:
        meta = _front_matter(content)
    except Exception as e:
        return 400, {"errors": [{"message": f"Invalid YAML in README.md metadata: {e}"}]}
    if meta is None:
        return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
    if not isinstance(meta, dict):
        return 400, {"errors": [{"message": "metadata must be a YAML mapping"}]}
    errors = []
    for key in ("license", "library_name", "pipeline_tag"):
        if key in meta and not isinstance(meta[key], str):
            errors.append({"message": f'"{key}" must be a string'})
    for key in ("tags", "base_model", "datasets", "language"):
        val = meta.get(key)
        if val is not None and not (isinstance(val, str) or (isinstance(val, list)
                                                             and all(isinstance(x, str) for x in val))):
            errors.append({"message": f'"{key}" must be a string or an array of strings'})
    return (400 if errors else 200), {"errors": errors, "warnings": []}
