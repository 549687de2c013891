"""Who may use the web app, and for what: roles, login throttling and session expiry.

- **Roles** (``users.role``, set by ``rlhf user add --role``): ``annotator`` annotates;
  ``playground`` may ask the policy questions in the Playground; ``admin`` may do everything,
  including the Dashboard (every annotator's name and rate). The Gradio app checks the role of
  the logged-in user in every handler (:func:`require`), so calling a handler directly through
  the queue API (``/gradio_api/queue/join``, ``/gradio_api/call/...``, ``gradio_client``) gets
  nothing a page would not show. Users and exports are managed with the CLI (``rlhf user add``,
  ``rlhf export``), which needs access to the database, not a login.
- **Login throttling** (:func:`login`): after ``app.login_max_failures`` failed logins within
  ``app.login_window_s`` for one username, or from one client address, further logins for it are
  refused for ``app.login_lockout_s`` with a message that says so (HTTP 429), even with the right
  password. Attempts are recorded in the database (``login_attempts``), so the limit holds
  across app processes. A success clears the username's count, not the address's. The address
  is the TCP peer (:class:`SessionMiddleware` hands it to the login check); ``X-Forwarded-For``
  is read only from a peer listed in ``app.trusted_proxies`` (none by default), so a client
  cannot claim another address. The per-username lock does not apply to an address from which
  that user has logged in before, so failures from elsewhere cannot lock the owner out (a
  password spray from one address is stopped by the per-address lock).
- **Unknown usernames** take as long as wrong passwords
  (:func:`rlhf_workbench.human.accounts.authenticate` checks a dummy hash).
- **Sessions** live in the database (``web_sessions``, the SHA-256 of each cookie token), so a
  login is valid on every app process over the same database and survives a restart (the
  cookie's name is kept in ``run_meta`` too). A login is valid for ``app.session_max_age_s``;
  after that every call of the session is answered 401 and the page shows the login form again
  (:class:`ExpiringTokens`, installed by :class:`SessionMiddleware` in place of Gradio's token
  table).
- **Every route but the login page needs a session** (:class:`SessionMiddleware`), whatever
  Gradio itself checks.
"""

from __future__ import annotations

import contextvars
import re
import time
from dataclasses import dataclass

import hashlib
import secrets

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from rlhf_workbench.human.accounts import authenticate
from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.store import LoginAttempt, RunMeta, Store, User, WebSession

PERMISSIONS = {
    "annotate": ("annotator", "admin"),
    "dashboard": ("admin",),
    "adjudicate": ("admin",),  # settle annotators' disagreements (rlhf_workbench.human.adjudication)
    "playground": ("playground", "admin"),
}
NO_SESSION = "Your session has expired or you are not logged in: reload the page and log in again."

CLIENT_ADDRESS: contextvars.ContextVar[str | None] = contextvars.ContextVar("client_address", default=None)


class NotAllowed(AnnotationError):
    """The logged-in user's role does not allow this action; nothing was read or written."""


# --- roles ---------------------------------------------------------------------------------------
def allowed(role: str | None, action: str) -> bool:
    """Whether ``role`` may do ``action`` (a key of :data:`PERMISSIONS`)."""
    return role in PERMISSIONS[action]


def require(store: Store, username: str | None, action: str) -> int:
    """The id of the logged-in user ``username`` if their role allows ``action``.

    Raises:
        AnnotationError: no session, or the account no longer exists.
        NotAllowed: the role does not allow ``action``.
    """
    if not username:
        raise AnnotationError(NO_SESSION)
    with store.session() as s:
        row = s.execute(select(User.id, User.role).where(User.username == username)).first()
    if row is None:
        raise AnnotationError(f"{NO_SESSION} (account {username!r} not found)")
    if not allowed(row.role, action):
        who = " or ".join(PERMISSIONS[action])
        raise NotAllowed(f"not allowed: the {action} needs the role {who}; {username!r} is {row.role!r}")
    return row.id


def role_of(store: Store, username: str | None) -> str | None:
    """The role of an account, or None when there is no such account."""
    if not username:
        return None
    with store.session() as s:
        return s.scalar(select(User.role).where(User.username == username))


def request_username(request) -> str | None:
    """The username logged in on a Gradio request (``gr.Request.username``); None without a
    request or a session."""
    return getattr(request, "username", None) if request is not None else None


def request_user(store: Store, request, action: str = "annotate") -> int:
    """The id of the user logged in on a Gradio ``request`` if their role allows ``action``
    (:func:`require` on :func:`request_username`).

    Raises:
        AnnotationError: no session, or the account no longer exists.
        NotAllowed: the role does not allow ``action``.
    """
    return require(store, request_username(request), action)


# --- login throttling ------------------------------------------------------------------------------
@dataclass
class LoginPolicy:
    """Limits on failed logins (the ``app:`` block of the run config)."""

    max_failures: int = 5
    window_s: float = 300.0
    lockout_s: float = 300.0

    @classmethod
    def from_config(cls, app_cfg) -> LoginPolicy:
        """The policy of a :class:`rlhf_workbench.config.AppConfig`."""
        return cls(app_cfg.login_max_failures, app_cfg.login_window_s, app_cfg.login_lockout_s)


class LoginThrottled(Exception):
    """Logins for this username or from this address are refused for now; ``str()`` says why and
    for how long."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


def _locked_until(s, column, value, policy: LoginPolicy, since: float) -> float | None:
    """When the lock on ``column == value`` ends, if ``max_failures`` failures after ``since`` fell
    within ``window_s`` and the last of them is less than ``lockout_s`` ago; else None."""
    times = list(s.scalars(select(LoginAttempt.at).where(column == value, LoginAttempt.ok.is_(False),
                                                         LoginAttempt.at > since)
                           .order_by(LoginAttempt.at.desc()).limit(policy.max_failures)))
    if len(times) < policy.max_failures or times[0] - times[-1] > policy.window_s:
        return None
    return times[0] + policy.lockout_s


def login(store: Store, username: str, password: str, address: str | None = None,
          policy: LoginPolicy | None = None, now: float | None = None) -> User | None:
    """Check a login with throttling; the account on success, None for a wrong password or an
    unknown user (indistinguishable, also in time).

    Raises:
        LoginThrottled: too many recent failures for this username or from this address; the
            password was not checked and the attempt is not counted.
    """
    policy = policy or LoginPolicy()
    now = time.time() if now is None else now
    name = username[:200]
    with store.session() as s:
        last_ok = s.scalar(select(LoginAttempt.at).where(LoginAttempt.username == name, LoginAttempt.ok.is_(True))
                           .order_by(LoginAttempt.at.desc()).limit(1)) or 0.0
        known = address is not None and s.scalar(select(LoginAttempt.id).where(
            LoginAttempt.username == name, LoginAttempt.address == address[:100], LoginAttempt.ok.is_(True)).limit(1))
        until = None if known else _locked_until(s, LoginAttempt.username, name, policy, last_ok)
        what = f"user {name!r}"
        if (until is None or until <= now) and address:
            until = _locked_until(s, LoginAttempt.address, address, policy, 0.0)
            what = f"address {address}"
    if until is not None and until > now:
        wait = until - now
        raise LoginThrottled(f"too many failed logins for {what} ({policy.max_failures} within "
                             f"{policy.window_s:.0f} s): try again in {wait:.0f} s", wait)
    user = authenticate(store, username, password)
    with store.session() as s, s.begin():
        s.add(LoginAttempt(username=name, address=(address or None) and address[:100], ok=user is not None, at=now))
        keep = max(policy.window_s, policy.lockout_s) * 4
        s.execute(delete(LoginAttempt).where(LoginAttempt.at < now - keep, LoginAttempt.ok.is_(False)))
    return user


# --- sessions --------------------------------------------------------------------------------------------
def _digest(token: str) -> str:
    return hashlib.sha256(str(token).encode("utf-8", "replace")).hexdigest()


class ExpiringTokens(dict):
    """Gradio's session table (cookie token -> username) kept in the database (``web_sessions``):
    shared by every app process over it, surviving a restart. Entries expire ``max_age`` seconds
    after the login that made them: an expired token reads as absent, so Gradio answers 401.
    Only each token's SHA-256 is stored; :meth:`keys` yields ``"sha256:<hex>"`` names, which
    indexing and deleting take as well as the tokens themselves (Gradio's logout walks them).

    Args:
        max_age: seconds a login stays valid.
        store: the run's database.
        initial: tokens to add (Gradio's table before this one replaced it).
    """

    def __init__(self, max_age: float, store: Store, initial: dict | None = None):
        super().__init__()
        self.max_age, self.store = max_age, store
        for k, v in (initial or {}).items():
            self[k] = v

    @staticmethod
    def _key(token) -> str:
        token = str(token)
        return token[7:] if token.startswith("sha256:") else _digest(token)

    def __setitem__(self, token, username) -> None:
        with self.store.session() as s, s.begin():
            s.merge(WebSession(token_sha256=self._key(token), username=str(username)[:100], issued_at=time.time()))

    def _live(self, s):
        return select(WebSession).where(WebSession.issued_at >= time.time() - self.max_age)

    def get(self, token, default=None):
        """The username of a live token, else ``default``."""
        if not token:
            return default
        with self.store.session() as s:
            row = s.scalar(self._live(s).where(WebSession.token_sha256 == self._key(token)))
        return row.username if row is not None else default

    def __getitem__(self, token):
        user = self.get(token)
        if user is None:
            raise KeyError(token)
        return user

    def __contains__(self, token) -> bool:
        return self.get(token) is not None

    def __delitem__(self, token) -> None:
        with self.store.session() as s, s.begin():
            s.execute(delete(WebSession).where(WebSession.token_sha256 == self._key(token)))

    def items(self):
        """Live ``("sha256:<hex>", username)`` pairs (expired sessions are deleted)."""
        with self.store.session() as s, s.begin():
            s.execute(delete(WebSession).where(WebSession.issued_at < time.time() - self.max_age))
            return [(f"sha256:{r.token_sha256}", r.username) for r in s.scalars(self._live(s))]

    def keys(self):
        """Names of live sessions (``"sha256:<hex>"``)."""
        return [k for k, _ in self.items()]

    def values(self):
        """Usernames of live sessions."""
        return [v for _, v in self.items()]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.items())


def cookie_id(store: Store) -> str:
    """The name suffix of the session cookie, kept in ``run_meta`` (``web_cookie_id``) so that
    every app process over the database reads the same cookie (Gradio draws a new one per process)."""
    for _ in range(2):
        with store.session() as s:
            row = s.get(RunMeta, "web_cookie_id")
        if row is not None:
            return str(row.value)
        try:
            with store.session() as s, s.begin():
                s.add(RunMeta(key="web_cookie_id", value=secrets.token_urlsafe(32)))
        except IntegrityError:
            pass  # another process stored it first
    raise RuntimeError("run_meta: could not store the session cookie id")


# Shows a too-many-failures answer (HTTP 429, with the reason) on Gradio's login form, which by
# itself reports only HTTP 400 ("Incorrect credentials"). Added to the page by SessionMiddleware:
# Gradio's own head= reaches the page only after login.
LOGIN_PAGE_JS = """
<script>
(() => {
  const fetch0 = window.fetch;
  window.fetch = async (...args) => {
    const res = await fetch0(...args);
    const url = String(args[0] && args[0].url || args[0]);
    if (!/\\/login\\/?$/.test(url.split('?')[0])) return res;
    let box = document.querySelector('#login-throttled');
    if (res.status !== 429) { if (box) box.remove(); return res; }
    let msg = 'Too many failed logins: try again later.';
    try { msg = (await res.clone().json()).detail || msg; } catch (e) {}
    if (!box) {
      box = document.createElement('p');
      box.id = 'login-throttled';
      box.style.color = 'var(--error-text-color, #b91c1c)';
      const btn = [...document.querySelectorAll('button')].find((b) => /log ?in/i.test(b.textContent));
      if (btn && btn.parentElement) btn.parentElement.insertBefore(box, btn); else document.body.prepend(box);
    }
    box.textContent = msg;
    return res;
  };
})();
</script>
"""


# What the login page itself loads: everything else needs a live session.
PUBLIC_PATHS = frozenset({"/", "/login", "/login/", "/logout", "/config", "/config/", "/favicon.ico",
                          "/manifest.json", "/robots.txt", "/theme.css", "/gradio_api/theme.css",
                          "/gradio_api/startup-events"})
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")
# Routes only an admin may read: Gradio's monitoring (whose key Gradio logs when the route is
# hit). The API description (/gradio_api/info, openapi) needs a session like every other route,
# but any role may read it: scripted annotators' gradio_client fetches it before each call
# (README "HTTP API"); the copy Gradio embeds in the page is removed for visitors without a
# session (the login page). Uploads are refused to everyone: the app has no upload component.
ADMIN_PREFIXES = ("/monitoring", "/gradio_api/monitoring")
REFUSED_PREFIXES = ("/gradio_api/upload", "/upload")
CALL_PREFIX = "/gradio_api/call/"


class SessionMiddleware:
    """ASGI middleware for the Gradio app.

    - Replaces Gradio's token table with :class:`ExpiringTokens` before the first request is
      served, so sessions expire after ``max_age`` seconds.
    - Answers 401 to any request without a live session except for the login page and its
      static files (:data:`PUBLIC_PATHS`, :data:`PUBLIC_PREFIXES`): Gradio checks the login on
      most of its routes, this makes it every route, including ones a later Gradio adds.
    - Puts the client's address where the login check can read it (:data:`CLIENT_ADDRESS`;
      Gradio's ``auth=`` callback gets only a username and a password).
    - Adds :data:`LOGIN_PAGE_JS` to the page, so that the login form says why a throttled login
      was refused.
    - Refuses uploads (403, :data:`REFUSED_PREFIXES`), answers 404 for a
      ``/gradio_api/call/<name>`` naming no handler, keeps :data:`ADMIN_PREFIXES` (monitoring)
      for admins (403 for other roles) and leaves the API description out of the login page.

    Args:
        app: the ASGI app.
        max_age: seconds a login stays valid.
        store: the run's database, holding the sessions (:class:`ExpiringTokens`).
    """

    def __init__(self, app, max_age: float, store: Store):
        self.app = app
        self.max_age = max_age
        self.store = store

    def _user(self, gradio_app, scope) -> str | None:
        """The username of the request's live session, else None."""
        from starlette.requests import HTTPConnection

        cookies = HTTPConnection(scope).cookies
        cookie = getattr(gradio_app, "cookie_id", None)
        for name in (f"access-token-{cookie}", f"access-token-unsecure-{cookie}"):
            token = cookies.get(name)
            user = gradio_app.tokens.get(token) if token else None
            if user is not None:
                return user
        return None

    def _install(self, gradio_app) -> None:
        """Sessions in the database, under a cookie name shared by every process over it."""
        if gradio_app is not None and hasattr(gradio_app, "tokens") \
                and not isinstance(gradio_app.tokens, ExpiringTokens):
            gradio_app.cookie_id = cookie_id(self.store)
            gradio_app.tokens = ExpiringTokens(self.max_age, self.store, gradio_app.tokens)

    def _refusal(self, gradio_app, path: str, user: str | None):
        """``(status, message)`` for a request the app does not serve to ``user``, else None."""
        if path.startswith(REFUSED_PREFIXES):
            return 403, "uploads are not accepted by this app"
        if path.startswith(ADMIN_PREFIXES) and role_of(self.store, user) != "admin":
            return 403, "not allowed: this route needs the role admin"
        if path.startswith(CALL_PREFIX) and gradio_app is not None:
            name = path[len(CALL_PREFIX):].split("/")[0]
            blocks = getattr(gradio_app, "blocks", None)
            names = {getattr(fn, "api_name", None) for fn in getattr(blocks, "fns", {}).values()}
            if name not in names:
                return 404, f"no handler named {name[:100]!r}"
        return None

    async def __call__(self, scope, receive, send):
        """Handle one ASGI connection."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        gradio_app = scope.get("app")
        self._install(gradio_app)
        path = scope.get("path", "")
        public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
        user = None if public or gradio_app is None else self._user(gradio_app, scope)
        if not public and gradio_app is not None and getattr(gradio_app, "auth", None) is not None and user is None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await JSONResponse({"detail": {"error": "Not authenticated", "auth_message": NO_SESSION}},
                               status_code=401)(scope, receive, send)
            return
        refusal = None if public else self._refusal(gradio_app, path, user)
        if refusal is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await JSONResponse({"detail": refusal[1]}, status_code=refusal[0])(scope, receive, send)
            return
        client = scope.get("client")
        reset = CLIENT_ADDRESS.set(client[0] if client else None)
        try:
            if path == "/" and scope.get("method") == "GET":
                await self.app(scope, receive, _with_login_script(send, keep_api_info=user is not None))
            else:
                await self.app(scope, receive, send)
        finally:
            CLIENT_ADDRESS.reset(reset)


API_INFO = re.compile(rb"window\.gradio_api_info\s*=\s*\{.*?\};?\s*</script>", re.S)


def _with_login_script(send, keep_api_info: bool = False):
    """``send`` for the page's HTML, with :data:`LOGIN_PAGE_JS` added to its head and, unless
    ``keep_api_info`` (a logged-in user's page), the embedded API description emptied."""
    from starlette.datastructures import MutableHeaders

    start, body = None, []

    async def wrapped(message):
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body":
            await send(message)
            return
        body.append(message.get("body", b""))
        if message.get("more_body"):
            return
        headers = MutableHeaders(raw=list(start["headers"]))
        data = b"".join(body)
        if "text/html" in headers.get("content-type", "") and "content-encoding" not in headers:
            data = data.replace(b"</head>", LOGIN_PAGE_JS.encode() + b"</head>", 1)
            if not keep_api_info:
                data = API_INFO.sub(b'window.gradio_api_info = {"named_endpoints": {}, "unnamed_endpoints": {}};'
                                    b"</script>", data)
            headers["content-length"] = str(len(data))
        await send({**start, "headers": headers.raw})
        await send({"type": "http.response.body", "body": data})

    return wrapped
